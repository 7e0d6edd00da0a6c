#!/bin/sh
# A throw-away Postgres cluster for Dagster's run, event and schedule storage, from Debian's `postgresql` package
# (initdb + pg_ctl; no system service). Everything lives in DIR; stopping it and deleting DIR leaves nothing behind.
#   deploy/docker/postgres.sh start DIR PORT [ADDRESSES]   prints `export DAGSTER_PG_...=...` lines for `eval`
#   deploy/docker/postgres.sh stop DIR
# ADDRESSES (default 127.0.0.1): where it listens, comma-separated; add a Docker network's gateway (e.g. that of
# `lm-saes`) so that run containers on that network reach it; password logins are allowed from 127.0.0.1 and from
# the /16 around each address (added on each start: a network made again may get another subnet). DAGSTER_PG_HOST is
# the last address. A stopped cluster starts again with its data. PG_FSYNC (default off: throw-away clusters) turns
# fsync on for one that must survive a crash. Run as root, it runs the server as `postgres`.
set -eu
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[ -x "$PG_BIN/pg_ctl" ] || { echo "no Postgres server binaries (apt-get install postgresql, or set PG_BIN)" >&2; exit 1; }

as_owner() {  # initdb and postgres refuse to run as root
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

command=${1:-}; dir=${2:-}
[ -n "$dir" ] || { echo "usage: $0 start DIR PORT [ADDRESSES] | stop DIR" >&2; exit 2; }
case "$command" in
start)
    port=${3:?PORT is required}; addresses=${4:-127.0.0.1}
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_owner sh -c "umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > '$dir/password'"
        as_owner "$PG_BIN/initdb" -D "$dir/data" -U dagster --pwfile="$dir/password" --auth-local=trust \
            --auth-host=scram-sha-256 -E UTF8 >"$dir/initdb.log"
    fi
    # On every start: a network made again since the last one may have another subnet.
    for address in $(echo "$addresses" | tr ',' ' '); do
        case "$address" in
        127.0.0.1|localhost) ;;
        *) line="host all all $(echo "$address" | cut -d. -f1-2).0.0/16 scram-sha-256"
           grep -qxF "$line" "$dir/data/pg_hba.conf" || echo "$line" >>"$dir/data/pg_hba.conf" ;;
        esac
    done
    as_owner "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=$addresses -c fsync=${PG_FSYNC:-off}" start >/dev/null
    as_owner "$PG_BIN/psql" -h "$dir" -p "$port" -U dagster -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'dagster'" | grep -q 1 \
        || as_owner "$PG_BIN/createdb" -h "$dir" -p "$port" -U dagster dagster
    echo "export DAGSTER_PG_HOST=$(echo "$addresses" | tr ',' '\n' | tail -n 1)"
    echo "export DAGSTER_PG_PORT=$port"
    echo "export DAGSTER_PG_USER=dagster"
    echo "export DAGSTER_PG_PASSWORD=$(cat "$dir/password")"
    echo "export DAGSTER_PG_DB=dagster"
    ;;
stop)
    [ -f "$dir/data/postmaster.pid" ] && as_owner "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    exit 0
    ;;
*)
    echo "usage: $0 start DIR PORT [ADDRESSES] | stop DIR" >&2; exit 2 ;;
esac
