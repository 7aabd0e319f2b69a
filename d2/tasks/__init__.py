"""Prefect tasks around the stages: the stage specs, the content-addressed stage cache, the
run manifest, MLflow tracking. Importing it sets nothing up: entry points call
:func:`d2.env.setup_env` first."""
