# optuna-dashboard with the same Optuna release as the workers, so that it reads their
# storage schema, and the PostgreSQL driver.
FROM python:3.11-slim

RUN pip install --no-cache-dir "optuna==5.0.0" "optuna-dashboard==0.21.0" "psycopg2-binary>=2.9,<3"
USER nobody
EXPOSE 8080
# The storage URL, password included, comes from the environment, never the command line.
CMD ["python", "-c", "import os, optuna_dashboard; optuna_dashboard.run_server(os.environ['OPTUNA_STORAGE'], host='0.0.0.0', port=8080)"]
