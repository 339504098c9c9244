#!/bin/sh
# Install dicomnode on a systemd host from its wheel (docs/operations.md, "Install on a systemd host").
#
#   make wheel                        # or: pip wheel --no-deps -w dist .
#   sudo deploy/install.sh            # newest dist/dicomnode-*.whl
#   sudo systemctl enable --now dicomnode
#
# What it does, each step safe to repeat (running it again with a newer wheel is the upgrade):
#   1. a venv at $PREFIX/venv (from $PYTHON, which must not live under /home or /root: the unit has ProtectHome=true),
#      torch pinned ($TORCH, from $TORCH_INDEX_URL when set: the CPU or a CUDA index), then the wheel (with $EXTRAS);
#   2. the user $SERVICE_USER (system account, home $STATEDIR) when run as root on the real root;
#   3. $CONFDIR/config.yaml from `dicomnode init` (absolute storage path $STATEDIR, the shipped models and rules),
#      only if there is none: an existing config is kept and checked;
#   4. the unit deploy/dicomnode.service with its paths and hardening rewritten for $PREFIX/$CONFDIR/$STATEDIR;
#   5. `dicomnode check-config` on the result; systemctl daemon-reload when systemd runs this root.
#
# Variables (environment):
#   ROOT=DIR      install everything under DIR (default: the real root); files name the paths under DIR, so the
#                 tree works in place (tests start the node from it). Users are not created and systemd is not told.
#   PREFIX, CONFDIR, STATEDIR, UNITDIR   default $ROOT/opt/dicomnode, $ROOT/etc/dicomnode, $ROOT/var/lib/dicomnode,
#                 $ROOT/etc/systemd/system
#   WHEEL=FILE    the wheel (default: the newest dist/dicomnode-*.whl beside this script's repository)
#   PYTHON        interpreter for the venv, 3.11 or newer (default: /usr/bin/python3)
#   TORCH         torch requirement (default torch==2.13.0); TORCH_INDEX_URL: index for it (CPU or CUDA builds)
#   EXTRAS        extras of the wheel, e.g. EXTRAS=ray for executor: {kind: ray}
#   PIP_ARGS      more pip options (e.g. --no-index --find-links /srv/wheels on an offline host)
#   DEPS_SITE=DIR use the dependencies already installed in site-packages DIR instead of installing them (a .pth
#                 file; only the wheel is installed): offline tests and hosts with a vetted environment
#   SERVICE_USER  default dicomnode; NODE_AET, NODE_PORT, PACS=AET@HOST:PORT: passed to `dicomnode init`
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
ROOT=${ROOT:-}
ROOT=${ROOT%/}
PREFIX=${PREFIX:-$ROOT/opt/dicomnode}
CONFDIR=${CONFDIR:-$ROOT/etc/dicomnode}
STATEDIR=${STATEDIR:-$ROOT/var/lib/dicomnode}
UNITDIR=${UNITDIR:-$ROOT/etc/systemd/system}
SERVICE_USER=${SERVICE_USER:-dicomnode}
PYTHON=${PYTHON:-/usr/bin/python3}
TORCH=${TORCH:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
EXTRAS=${EXTRAS:-}
PIP_ARGS=${PIP_ARGS:-}
DEPS_SITE=${DEPS_SITE:-}

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

if [ -z "${WHEEL:-}" ]; then
    WHEEL=$(ls -t "$repo"/dist/dicomnode-*.whl 2>/dev/null | head -n 1 || true)
    [ -n "$WHEEL" ] || die "no wheel: build one (make wheel) or set WHEEL=FILE"
fi
[ -f "$WHEEL" ] || die "wheel not found: $WHEEL"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than Python 3.11"
base=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')
case "$base" in
    /home/*|/root/*|/run/user/*)
        [ -n "$ROOT" ] || die "$PYTHON resolves to $base, which ProtectHome=true hides from the service: use a system Python" ;;
esac

# 1. the venv and the wheel
venv=$PREFIX/venv
mkdir -p "$PREFIX"
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv from $base"
    "$PYTHON" -m venv "$venv"
fi
pip="$venv/bin/python -m pip --disable-pip-version-check"
if [ -n "$DEPS_SITE" ]; then
    [ -d "$DEPS_SITE" ] || die "DEPS_SITE $DEPS_SITE is not a folder"
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # A plain path line: the folder is appended to sys.path after the venv's own site-packages, so the wheel
    # installed here wins over anything of the same name there; .pth files inside DEPS_SITE are not run.
    printf '%s\n' "$DEPS_SITE" > "$site/zz_dicomnode_deps.pth"
    say "dependencies from $DEPS_SITE"
    # shellcheck disable=SC2086
    $pip install -q --no-deps --no-index --force-reinstall $PIP_ARGS "$WHEEL"
else
    # The pinned torch first: a bare "torch" requirement would pull whatever build pip picks (multi-GB CUDA on Linux).
    # shellcheck disable=SC2086
    $pip install -q $PIP_ARGS ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH"
    # shellcheck disable=SC2086
    $pip install -q $PIP_ARGS "$WHEEL${EXTRAS:+[$EXTRAS]}"
    # The same version number again (a rebuilt wheel) is not reinstalled by pip unless forced; dependencies stay.
    # shellcheck disable=SC2086
    $pip install -q --no-deps --force-reinstall $PIP_ARGS "$WHEEL"
fi
dicomnode=$venv/bin/dicomnode
say "installed $("$dicomnode" --version) into $venv"
mkdir -p "$PREFIX/doc"
for doc in operations.md configuration.md scaling.md security.md; do
    if [ -f "$repo/docs/$doc" ]; then cp "$repo/docs/$doc" "$PREFIX/doc/"; fi
done

# 2. the service user (only on the real root, as root)
as_root=false
[ "$(id -u)" = 0 ] && [ -z "$ROOT" ] && as_root=true
if $as_root && ! id "$SERVICE_USER" >/dev/null 2>&1; then
    say "creating system user $SERVICE_USER"
    useradd --system --user-group --home-dir "$STATEDIR" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
fi

# 3. state and config
mkdir -p "$STATEDIR" "$CONFDIR"
chmod 0700 "$STATEDIR"
config=$CONFDIR/config.yaml
if [ -f "$config" ]; then
    say "keeping $config (an upgrade never rewrites it)"
else
    set -- init --dir "$CONFDIR" --storage "$STATEDIR"
    [ -n "${NODE_AET:-}" ] && set -- "$@" --ae-title "$NODE_AET"
    [ -n "${NODE_PORT:-}" ] && set -- "$@" --port "$NODE_PORT"
    [ -n "${PACS:-}" ] && set -- "$@" --pacs "$PACS"
    "$dicomnode" "$@"
fi
if $as_root; then
    chown -R "$SERVICE_USER:$SERVICE_USER" "$STATEDIR"
    chown "root:$SERVICE_USER" "$CONFDIR" "$config"
    chmod 0750 "$CONFDIR"
    chmod 0640 "$config"
fi

# 4. the unit, its paths and hardening matching this install
mkdir -p "$UNITDIR"
unit=$UNITDIR/dicomnode.service
sed -e "s#/opt/dicomnode#$PREFIX#g" -e "s#/etc/dicomnode#$CONFDIR#g" -e "s#/var/lib/dicomnode#$STATEDIR#g" \
    -e "s#^User=dicomnode#User=$SERVICE_USER#" -e "s#^Group=dicomnode#Group=$SERVICE_USER#" \
    "$here/dicomnode.service" > "$unit.tmp"
if [ "$STATEDIR" != /var/lib/dicomnode ]; then
    # StateDirectory= only names folders under /var/lib; elsewhere ReadWritePaths= alone opens storage.
    sed -i -e '/^StateDirectory/d' "$unit.tmp"
fi
mv "$unit.tmp" "$unit"
chmod 0644 "$unit"
say "unit $unit"

# 5. check, and tell systemd
"$dicomnode" check-config "$config"
if $as_root && [ -d /run/systemd/system ] && [ "$UNITDIR" = /etc/systemd/system ]; then
    systemctl daemon-reload
    say "done: systemctl enable --now dicomnode; journalctl -u dicomnode -f"
else
    say "done: the node runs as: $dicomnode serve --config $config"
fi
