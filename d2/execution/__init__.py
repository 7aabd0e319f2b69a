"""How one stage executes: the Prefect task that runs it (stage_task), the stage specs (stages),
the content-addressed stage cache (cache), the run manifest (manifest), MLflow tracking
(tracking) and live progress (progress). Importing it sets nothing up: entry points call
:func:`d2.env.setup_env` first."""
