#!/usr/bin/env bash
# Checks that a resolved kernel .config holds every option the fragments
# ask for: `CONFIG_X=v` lines as set, `# CONFIG_X is not set` lines unset.
# Kconfig silently drops an option whose dependencies are missing; this
# makes such a drop fail the build and names each option lost.
#
# Usage: guest/kernel/check-config.sh RESOLVED_CONFIG FRAGMENT...
set -euo pipefail
config=${1:?usage: check-config.sh RESOLVED_CONFIG FRAGMENT...}
shift
[ $# -gt 0 ] || { echo "check-config: no fragment given" >&2; exit 2; }
[ -f "$config" ] || { echo "check-config: $config missing" >&2; exit 2; }

bad=0 n=0
while IFS= read -r line; do
  case $line in
    CONFIG_*=*) opt=${line%%=*} ;;
    "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *} ;;
    *) continue ;;
  esac
  n=$((n + 1))
  got=$(grep -E "^(# )?$opt[= ]" "$config" || true)
  if [ "$line" = "# $opt is not set" ] && [ -z "$got" ]; then
    continue # an option whose menu is off is not set either
  fi
  if [ "$got" != "$line" ]; then
    echo "check-config: $opt: fragment wants '$line', resolved config has '${got:-nothing}'" >&2
    bad=$((bad + 1))
  fi
done < <(cat "$@")
if [ "$bad" -gt 0 ]; then
  echo "check-config: $bad of $n options in $* did not survive" >&2
  exit 1
fi
echo "check-config: all $n options of $* are in $config"
