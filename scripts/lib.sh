# Sourced by the scripts that need Python tools from PyPI.

TOOLS=${ORDERWAVE_TOOLS:-/var/tmp/orderwave-tools}

# pinned_venv NAME PACKAGE==VERSION...: prints the path of a virtualenv under $TOOLS holding
# exactly these pins, creating it (once, under a lock against parallel callers) when it is
# missing or was made with other pins.
pinned_venv() {
  local name=$1; shift
  local venv="$TOOLS/$name"
  mkdir -p "$TOOLS"
  (
    flock 9
    if [ "$(cat "$venv/.pins" 2>/dev/null)" != "$*" ]; then
      echo "installing $* into $venv" >&2
      rm -rf "$venv"
      python3 -m venv "$venv"
      "$venv/bin/pip" install -q "$@" >&2
      echo "$*" >"$venv/.pins"
    fi
  ) 9>"$TOOLS/.$name.lock"
  echo "$venv"
}

# debian_promtool: prints the path of promtool taken from Debian's prometheus package
# (downloaded and unpacked under $TOOLS once; the server in it is neither installed nor run).
debian_promtool() {
  local dir="$TOOLS/promtool"
  mkdir -p "$TOOLS"
  (
    flock 9
    if [ ! -x "$dir/usr/bin/promtool" ]; then
      echo "unpacking promtool from Debian's prometheus package into $dir" >&2
      rm -rf "$dir" && mkdir -p "$dir"
      (cd "$dir" && apt-get download prometheus >&2 && dpkg -x prometheus_*.deb . && rm -f prometheus_*.deb)
    fi
  ) 9>"$TOOLS/.promtool.lock"
  echo "$dir/usr/bin/promtool"
}
