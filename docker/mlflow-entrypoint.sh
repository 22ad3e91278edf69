#!/bin/sh
# Start `mlflow server` with the arguments of docker-compose.yml, after writing the
# basic-auth configuration from the environment, so that the password of the auth database
# lives in no file of the repository and on no command line.
set -eu
: "${MLFLOW_AUTH_DATABASE_URI:?must be set; docker-compose.yml builds it from .env}"
umask 077
config_dir=$(mktemp -d)
cat > "$config_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config_dir/basic_auth.ini"
exec mlflow server "$@"
