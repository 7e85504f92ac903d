//! `--redact-keys` in process. Redaction is a process-wide switch, so these
//! tests live in a binary of their own and all run with it on.

use etcd_syncer::etcd::auth::{AuthChange, KeyRange, PermType};
use etcd_syncer::model::redact;

const SECRET: &str = "/tenants/acme-secret/";

fn redacting() {
    redact::set_enabled(true);
}

/// Every message that carries a key range (auth sync's changes, which its
/// `Apply` error and log lines quote) shows the hash, never the key bytes.
#[test]
fn messages_with_keys_show_only_their_hash() {
    redacting();
    let range = KeyRange::new(SECRET, "/tenants/acme-secret0");
    let single = KeyRange::new(SECRET, "");
    let grant = AuthChange::RoleGrantPermission {
        role: "reader".into(),
        range: range.clone(),
        perm: PermType::Read,
    };
    let revoke = AuthChange::RoleRevokePermission {
        role: "reader".into(),
        range: single.clone(),
    };
    for shown in [
        range.to_string(),
        single.to_string(),
        grant.to_string(),
        revoke.to_string(),
    ] {
        assert!(!shown.contains("acme"), "{shown}");
        assert!(
            shown.contains(&format!("<key:{:08x}>", redact::fnv1a(SECRET.as_bytes()))),
            "{shown}"
        );
    }
    // The same key always shows the same hash, so lines can be correlated.
    assert_eq!(single.to_string(), KeyRange::new(SECRET, "").to_string());
}

#[test]
fn keys_and_values_are_redacted_while_enabled() {
    redacting();
    assert!(redact::is_enabled());
    assert!(!redact::key(b"acme").to_string().contains("acme"));
    assert!(!format!("{:?}", redact::value(b"acme")).contains("acme"));
}
