//! Consul service identities as they appear in a certificate's URI SAN.

/// A Consul service identity: `spiffe://<td>[/ap/<partition>]/ns/<ns>/dc/<dc>/svc/<service>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub partition: Option<String>,
    pub namespace: String,
    pub datacenter: String,
    pub service: String,
}

impl SpiffeId {
    /// Parses a service identity; agent, server and gateway identities are refused since
    /// only services are sources of intentions.
    pub fn parse(uri: &str) -> Result<SpiffeId, String> {
        const SCHEME: &str = "spiffe://";
        let rest = match uri.get(..SCHEME.len()) {
            Some(s) if s.eq_ignore_ascii_case(SCHEME) => &uri[SCHEME.len()..],
            _ => return Err(format!("{uri} is not a spiffe:// URI")),
        };
        if rest.contains(['?', '#']) {
            return Err(format!("{uri} has a query or fragment"));
        }
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        if host.is_empty() {
            return Err(format!("{uri} has no trust domain"));
        }
        let segs: Vec<&str> = path.split('/').collect();
        let (partition, tail) = match segs.as_slice() {
            ["ap", ap, tail @ ..] => (Some(*ap), tail),
            all => (None, all),
        };
        let ["ns", ns, "dc", dc, "svc", svc] = tail else {
            return Err(format!("{uri} is not a service identity"));
        };
        let part = |s: &str| -> Result<String, String> {
            let d = percent_decode(s).ok_or_else(|| format!("{uri} has bad percent-encoding"))?;
            if d.is_empty() {
                return Err(format!("{uri} has an empty path segment"));
            }
            Ok(d)
        };
        Ok(SpiffeId {
            trust_domain: host.to_owned(),
            partition: partition.map(part).transpose()?,
            namespace: part(ns)?,
            datacenter: part(dc)?,
            service: part(svc)?,
        })
    }
}

/// Consul unescapes the path of an identity before comparing, so we must too.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            // Checked by hand: from_str_radix would also take a sign ("%+1").
            let nibble = |c: u8| (c as char).to_digit(16);
            out.push((nibble(hex[0])? * 16 + nibble(hex[1])?) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
