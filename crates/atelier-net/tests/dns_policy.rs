//! The JSON form of the egress policy the forwarder enforces, as the API and the DB
//! store it (atelier-core has no JSON dependency, so it is pinned here).

use atelier_core::{DomainPattern, EgressPolicy};
use serde_json::json;

#[test]
fn policy_json_forms() {
    assert_eq!(
        serde_json::to_value(EgressPolicy::AllowAll).unwrap(),
        json!("allow-all")
    );
    assert_eq!(
        serde_json::to_value(EgressPolicy::DenyAll).unwrap(),
        json!("deny-all")
    );
    let list: EgressPolicy = "github.com,*.pypi.org".parse().unwrap();
    assert_eq!(
        serde_json::to_value(&list).unwrap(),
        json!({"allow": ["github.com", "*.pypi.org"]})
    );
    for policy in [EgressPolicy::AllowAll, EgressPolicy::DenyAll, list] {
        let text = serde_json::to_string(&policy).unwrap();
        assert_eq!(serde_json::from_str::<EgressPolicy>(&text).unwrap(), policy);
    }
}

#[test]
fn policy_json_is_validated_and_normalised() {
    let p: EgressPolicy =
        serde_json::from_value(json!({"allow": ["GitHub.com.", "github.com"]})).unwrap();
    assert_eq!(p, "github.com".parse().unwrap());
    for bad in [
        json!({"allow": []}),
        json!({"allow": ["1.2.3.4"]}),
        json!({"allow": ["*.org"]}),
        json!({"allow": "github.com"}),
        json!({"deny": ["github.com"]}),
        json!("allow"),
        json!("allow_all"),
        json!(null),
    ] {
        assert!(
            serde_json::from_value::<EgressPolicy>(bad.clone()).is_err(),
            "{bad}"
        );
    }
    let many: Vec<String> = (0..257).map(|i| format!("h{i}.example.com")).collect();
    assert!(serde_json::from_value::<EgressPolicy>(json!({ "allow": many })).is_err());
    let err = serde_json::from_value::<EgressPolicy>(json!({"allow": ["ok.com", "bad_one.com"]}))
        .unwrap_err();
    assert!(err.to_string().contains("bad_one.com"), "{err}");
}

#[test]
fn pattern_json_is_a_string() {
    let p: DomainPattern = serde_json::from_value(json!("*.PyPI.org")).unwrap();
    assert_eq!(serde_json::to_value(&p).unwrap(), json!("*.pypi.org"));
    assert!(serde_json::from_value::<DomainPattern>(json!("a*.pypi.org")).is_err());
}
