"""kubealign: the control-plane side (operator, API model, planner, renderers). Never imports torch."""
