# The MLflow tracking server of docker-compose.yml: the pinned MLflow image plus the
# PostgreSQL driver, boto3 for an S3-compatible artifact store, and what the basic-auth
# app needs (the `auth` extra).
FROM ghcr.io/mlflow/mlflow:v3.17.2

RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2"
COPY mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint
ENTRYPOINT ["/bin/sh", "/usr/local/bin/mlflow-entrypoint"]
