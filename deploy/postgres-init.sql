-- One PostgreSQL serves two stores: the `mlflow` database (created by the image from POSTGRES_DB)
-- holds MLflow's tracking and registry tables; `optuna` holds the Optuna studies of `adaptive-kv train`.
CREATE DATABASE optuna;
