# Sourced, not run. build_dataplaneapi OUT builds github.com/haproxytech/dataplaneapi at
# $DATAPLANEAPI_MODULE_VERSION (scripts/versions.env) into OUT, with the caller's environment
# (CGO_ENABLED=0 for a static binary). `go install pkg@version` needs the module's version list
# (for deprecation notices), which the proxy here refuses, so the binary is built through a
# throwaway module that requires the pinned version; `go version -m` reads that version back.
build_dataplaneapi() {
  local out="$1" work
  command -v go >/dev/null 2>&1 || { echo "go is needed to build dataplaneapi" >&2; return 1; }
  work="$(mktemp -d)"
  (
    cd "$work"
    go mod init haproxy-consul-connect/dpapi-build >/dev/null 2>&1
    printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/haproxytech/dataplaneapi/cmd/dataplaneapi"\n' >tools.go
    GOFLAGS=-mod=mod go get "github.com/haproxytech/dataplaneapi/cmd/dataplaneapi@$DATAPLANEAPI_MODULE_VERSION" 2>/dev/null
    mkdir -p "$(dirname "$out")"
    # Its version variables are set by its own Makefile from git, which a module download has
    # not: stamp the pinned tag and the module's release time, so -version tells what runs.
    local released pkg=main
    released="$(go mod download -json "github.com/haproxytech/dataplaneapi@$DATAPLANEAPI_MODULE_VERSION" |
      python3 -c 'import json,sys; print(json.load(sys.stdin).get("Time", ""))')"
    GOFLAGS=-mod=mod go build \
      -ldflags "-X $pkg.GitRepo=github.com/haproxytech/dataplaneapi -X $pkg.GitTag=$DATAPLANEAPI_MODULE_VERSION -X $pkg.GitCommit=(Go-module-proxy) -X $pkg.GitDirty= -X $pkg.BuildTime=$released" \
      -o "$out.new" github.com/haproxytech/dataplaneapi/cmd/dataplaneapi
  ) || { rm -rf "$work"; return 1; }
  rm -rf "$work"
  mv -f "$out.new" "$out"
}
