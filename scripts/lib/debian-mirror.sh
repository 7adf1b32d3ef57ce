# Sourced, not run. debian_mirror prints the URI of this machine's own Debian archive, read
# from its apt configuration at run time (deb822 .sources or one-line .list), so no package host
# is ever written into the repository. The first `URIs:`/`deb` entry whose suite is a plain
# Debian release (not -security) wins. Prints nothing and returns 1 when none is configured.
debian_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    uri="$(awk '
      /^[[:space:]]*$/ { if (u != "" && s ~ /(bookworm|bullseye|trixie|sid|stable|testing|unstable)/ && s !~ /security/) { print u; exit } u=""; s=""; next }
      /^URIs:/ { u=$2 } /^Suites:/ { s=$0 }
      END { if (u != "" && s ~ /(bookworm|bullseye|trixie|sid|stable|testing|unstable)/ && s !~ /security/) print u }' "$f" | head -1)"
    if [ -n "$uri" ] && [[ "$uri" != *security* ]]; then printf '%s\n' "${uri%/}"; return 0; fi
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    uri="$(awk '$1=="deb" { i=2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i+1) !~ /security/) { print $i; exit } }' "$f")"
    if [ -n "$uri" ]; then printf '%s\n' "${uri%/}"; return 0; fi
  done
  return 1
}
