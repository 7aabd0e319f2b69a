"""Prefect tasks around the stages: the content-addressed stage cache, the run manifest,
MLflow tracking. Importing this package sets the Prefect/MLflow environment first."""

from d2.tasks.env import setup_env

setup_env()
