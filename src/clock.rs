//! The wall clock that certificate decisions read.
//!
//! Production code takes "now" from here rather than from `SystemTime::now()` so that the unit
//! tests can be run with the clock moved (`HCC_TEST_CLOCK_SHIFT_DAYS=365 cargo test --lib`):
//! a test that judges a recorded certificate against the real date then fails at once, not on
//! the day the certificate expires. Only test builds read the shift; the sidecar cannot be
//! told to lie about the time.

use std::time::SystemTime;

pub fn now() -> SystemTime {
    #[cfg(test)]
    {
        test_support::shifted(SystemTime::now())
    }
    #[cfg(not(test))]
    {
        SystemTime::now()
    }
}

#[cfg(test)]
pub mod test_support {
    use std::sync::OnceLock;
    use std::time::{Duration, SystemTime};

    /// Days to add to the wall clock, from `HCC_TEST_CLOCK_SHIFT_DAYS` (negative moves it back).
    fn shift_days() -> i64 {
        static SHIFT: OnceLock<i64> = OnceLock::new();
        *SHIFT.get_or_init(|| match std::env::var("HCC_TEST_CLOCK_SHIFT_DAYS") {
            Ok(v) => v.trim().parse().unwrap_or_else(|_| {
                panic!("HCC_TEST_CLOCK_SHIFT_DAYS={v:?} is not a whole number of days")
            }),
            Err(_) => 0,
        })
    }

    pub fn shifted(t: SystemTime) -> SystemTime {
        let days = shift_days();
        let by = Duration::from_secs(days.unsigned_abs() * 86_400);
        if days >= 0 {
            t + by
        } else {
            t - by
        }
    }

    /// An hour after a certificate's notBefore: the moment a test judges a recorded
    /// certificate at, so its verdict depends on the certificate, never on today's date.
    pub fn inside_validity(der: &[u8]) -> SystemTime {
        let (_, cert) = x509_parser::parse_x509_certificate(der).expect("test certificate parses");
        let secs = cert.validity().not_before.timestamp() + 3600;
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).expect("after 1970"))
    }

    /// The certificate's own validity bounds as `SystemTime`s: (notBefore, notAfter).
    pub fn validity(der: &[u8]) -> (SystemTime, SystemTime) {
        let (_, cert) = x509_parser::parse_x509_certificate(der).expect("test certificate parses");
        let at = |secs: i64| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).expect("after 1970"))
        };
        (
            at(cert.validity().not_before.timestamp()),
            at(cert.validity().not_after.timestamp()),
        )
    }

    #[test]
    fn shift_applies_only_through_now() {
        // The expected shift is read from the environment here, not from `shift_days`, so a
        // shift that is parsed wrongly or dropped fails rather than agreeing with itself.
        let want: i64 = match std::env::var("HCC_TEST_CLOCK_SHIFT_DAYS") {
            Ok(v) => v.trim().parse().expect("a whole number of days"),
            Err(_) => 0,
        };
        let real = SystemTime::now();
        let ours = super::now();
        let diff = match ours.duration_since(real) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        };
        assert!(
            (diff - want * 86_400).abs() < 60,
            "HCC_TEST_CLOCK_SHIFT_DAYS={want}, saw now() {diff} s from the wall clock"
        );
    }
}
