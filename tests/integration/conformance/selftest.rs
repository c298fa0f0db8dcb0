//! The self-test: the power-on subset, the full set, and the `tenant-kms selftest` command.

use std::process::Command;

use tenant_kms::selftest::{self, Table};

use super::report;

#[test]
fn power_on_self_test_passes() {
    selftest::power_on().unwrap();
    let reports = selftest::power_on_reports();
    assert!(reports.iter().all(|r| r.ok()));
    let cases: usize = reports.iter().map(|r| r.cases()).sum();
    report(&format!(
        "power-on self-test: {} suites, {cases} cases, all ok",
        reports.len()
    ));
}

#[test]
fn full_self_test_passes_every_suite() {
    let reports = selftest::full();
    let table = Table(&reports).to_string();
    selftest::first_failure(&reports).unwrap_or_else(|e| panic!("{e}\n{table}"));
    for suite in [
        "power-on: AES-256-GCM KAT",
        "power-on: HKDF-SHA256 KAT",
        "power-on: wire format KAT",
        "RFC 5869 A.1-A.3 HKDF-SHA256",
        "Wycheproof AES-GCM",
        "Wycheproof HKDF-SHA256",
        "vectors: field_value.json",
        "vectors: data_key.json",
        "vectors: tenant_key_wrap.json",
        "vectors: audit_key_wrap.json",
        "vectors: key_check.json",
    ] {
        assert!(
            reports.iter().any(|r| r.suite == suite && r.ok()),
            "{suite} missing or failed"
        );
    }
    let gcm = reports
        .iter()
        .find(|r| r.suite == "Wycheproof AES-GCM")
        .unwrap();
    assert_eq!((gcm.passed, gcm.refused), (66, 250));
    let total: usize = reports.iter().map(|r| r.cases()).sum();
    report(&format!(
        "full self-test: {} suites, {total} cases, all ok",
        reports.len()
    ));
}

#[test]
fn selftest_command_prints_its_table_and_exits_zero() {
    let out = Command::new(env!("CARGO_BIN_EXE_tenant-kms"))
        .arg("selftest")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    let first = stdout.lines().next().unwrap();
    assert!(
        first.starts_with("suite") && first.ends_with("result"),
        "{first}"
    );
    assert!(stdout.contains("Wycheproof AES-GCM"));
    let last = stdout.lines().last().unwrap();
    assert!(last.starts_with("total") && last.ends_with(" ok"), "{last}");
    assert!(!stdout.contains("FAILED"));

    let out = Command::new(env!("CARGO_BIN_EXE_tenant-kms"))
        .args(["selftest", "--power-on"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        !String::from_utf8(out.stdout)
            .unwrap()
            .contains("Wycheproof")
    );
}
