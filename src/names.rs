//! Names the sidecar makes from what Consul says: HAProxy object names and directory names.

/// HAProxy proxy and server names take letters, digits and `-_.:`; anything else becomes `_`.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_keeps_haproxy_names_legal() {
        assert_eq!(sanitize("web/v2 (blue)"), "web_v2__blue_");
        assert_eq!(sanitize("a.b-c_d:1"), "a.b-c_d:1");
    }
}
