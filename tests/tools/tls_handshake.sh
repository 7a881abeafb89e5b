#!/bin/bash
# One TLS handshake between `openssl s_server` and `openssl s_client` (both with the custody
# provider loaded), for provider_integration_test. Usage:
#   tls_handshake.sh DIR PORT -- SERVER_ARGS... -- CLIENT_ARGS...
# CLIENT_PREFIX (env, optional) runs the client under e.g. setpriv. Writes DIR/server.log and
# DIR/client.log; exits with the client's status (124 on timeout), 3 if the server never listened.
set -u
dir=$1 port=$2
shift 2
[ "$1" = "--" ] && shift
server_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do server_args+=("$1"); shift; done
[ $# -gt 0 ] && shift
client_args=("$@")
prov=(-provider custody -provider default -propquery "?provider=default")
# TLS_PROVIDERS_FROM_CONF=1: the providers come from $OPENSSL_CONF instead (its own order).
[ "${TLS_PROVIDERS_FROM_CONF:-0}" = 1 ] && prov=()

# -www: the server answers one HTTP request with its view of the session (including the client
# certificate it verified) and does not read stdin.
timeout 60 openssl s_server "${prov[@]}" -accept "127.0.0.1:$port" -naccept 1 -www \
  "${server_args[@]}" > "$dir/server.log" 2>&1 < /dev/null &
server=$!
for _ in $(seq 1 100); do
  grep -q '^ACCEPT' "$dir/server.log" 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || break
  sleep 0.1
done
if ! grep -q '^ACCEPT' "$dir/server.log"; then
  kill "$server" 2>/dev/null
  wait "$server" 2>/dev/null
  exit 3
fi
# shellcheck disable=SC2086
printf 'GET / HTTP/1.0\r\n\r\n' | timeout 30 ${CLIENT_PREFIX:-} openssl s_client "${prov[@]}" \
  -connect "127.0.0.1:$port" -ign_eof "${client_args[@]}" > "$dir/client.log" 2>&1
rc=$?
# The server exits after its one connection; it is stopped if the client never got that far.
for _ in $(seq 1 50); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
kill "$server" 2>/dev/null
wait "$server" 2>/dev/null
exit $rc
