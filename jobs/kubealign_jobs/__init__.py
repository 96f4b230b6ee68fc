"""kubealign_jobs: the trainer side that runs in each stage pod. Never imports kopf."""
