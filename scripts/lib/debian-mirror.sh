# Sourced, not run. debian_mirror prints the URI of this machine's own Debian archive, read from
# its apt configuration at run time by scripts/debian-mirror (deb822 or one-line form), so no
# package host is ever written into the repository. Returns 1 when none is configured.
debian_mirror() {
  local line
  line="$("$(dirname "${BASH_SOURCE[0]}")/../debian-mirror")" || return 1
  [ -n "$line" ] || return 1
  line="${line%%$'\t'*}"
  printf '%s\n' "${line%/}"
}
