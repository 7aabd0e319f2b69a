"""Run reports people look at: a self-contained HTML page per run folder and its preview media."""
