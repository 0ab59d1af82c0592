"""Models: backbones (registry), the classifier record, stage plans, learning-rate schedules, parameter groups."""
