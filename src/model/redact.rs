//! `--redact-keys`: every key or value that goes into a log field, an error
//! message or a check sample is shown through [`key`] or [`value`], which
//! print a stable short hash (`<key:fnv1a-hex>`) instead of the bytes when
//! redaction is on, so an operator can still correlate lines.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

static REDACT: AtomicBool = AtomicBool::new(false);

/// Turns redaction on or off for the whole process (set once at start).
pub fn set_enabled(enabled: bool) {
    REDACT.store(enabled, Ordering::SeqCst);
}

pub fn is_enabled() -> bool {
    REDACT.load(Ordering::SeqCst)
}

/// 32-bit FNV-1a: stable across runs and builds, short enough to read.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

/// A key (or key prefix) as shown in logs and errors.
pub fn key(bytes: &[u8]) -> Shown<'_> {
    Shown {
        bytes,
        kind: "key",
        redact: is_enabled(),
    }
}

/// A value as shown in logs and errors.
pub fn value(bytes: &[u8]) -> Shown<'_> {
    Shown {
        bytes,
        kind: "value",
        redact: is_enabled(),
    }
}

/// The bytes as text, or `<kind:hash>` when redacted.
#[derive(Clone, Copy)]
pub struct Shown<'a> {
    bytes: &'a [u8],
    kind: &'static str,
    redact: bool,
}

impl Shown<'_> {
    /// The same, redacted whatever the process setting (tests).
    pub fn redacted(self) -> Self {
        Self {
            redact: true,
            ..self
        }
    }
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.redact {
            write!(f, "<{}:{:08x}>", self.kind, fnv1a(self.bytes))
        } else {
            write!(f, "{}", String::from_utf8_lossy(self.bytes).escape_debug())
        }
    }
}

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_keys_show_a_stable_hash_only() {
        let shown = key(b"/registry/secret-name").redacted().to_string();
        assert_eq!(
            shown,
            format!("<key:{:08x}>", fnv1a(b"/registry/secret-name"))
        );
        assert!(!shown.contains("secret"));
        assert_eq!(shown, key(b"/registry/secret-name").redacted().to_string());
        assert_ne!(shown, key(b"/registry/other").redacted().to_string());
        assert!(value(b"v").redacted().to_string().starts_with("<value:"));
        // FNV-1a's published test vector.
        assert_eq!(fnv1a(b"a"), 0xe40c_292c);
    }

    #[test]
    fn unredacted_keys_show_their_text() {
        let shown = Shown {
            bytes: b"/app/a\n",
            kind: "key",
            redact: false,
        };
        assert_eq!(shown.to_string(), "/app/a\\n");
    }
}
