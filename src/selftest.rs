//! Cryptographic self-tests, in the manner of a FIPS 140 module's power-on self-test.
//!
//! - [`power_on`] runs small known-answer tests of AES-256-GCM (NIST GCM spec test cases),
//!   HKDF-SHA256 (RFC 5869 A.1) and the v1 wire format (the first vectors of our own vector
//!   files). The server runs it before it opens anything (`AppState::open`) and refuses to
//!   serve if it fails: a crypto library that computes wrong answers must not seal data.
//! - [`full`] adds RFC 5869 A.1–A.3, the Wycheproof AES-GCM and HKDF-SHA256 sets, every
//!   vector of `vectors/*.json`, and RFC 5297 A.1–A.2 (AES-SIV) for searchable columns;
//!   `tenant-kms selftest` prints its table.
//!
//! Everything runs through the same functions the service uses (`crypto::aead`,
//! `crypto::kdf`, `crypto::format`, `crypto::envelope`), and all data is embedded in the
//! binary, so the self-test needs no files. Pure: no I/O, no async.

pub mod kat;
pub mod searchable;
pub mod vectors;
pub mod wycheproof;

use std::fmt;

/// How one test case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseOutcome {
    /// The case ran and gave the expected answer.
    Passed,
    /// The case is outside what tenant-kms accepts (another key or nonce size) and our API
    /// refused it, as it must.
    Refused,
    /// The case gave a wrong answer; the text names the case and what differed (test data
    /// only, never a live secret).
    Failed(String),
}

/// The result of one suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteReport {
    /// The suite's name.
    pub suite: &'static str,
    /// Cases that ran and passed.
    pub passed: usize,
    /// Cases outside our parameters that the API refused (counted as correct).
    pub refused: usize,
    /// The failed cases, each described.
    pub failures: Vec<String>,
}

impl SuiteReport {
    /// An empty report.
    pub fn new(suite: &'static str) -> Self {
        Self {
            suite,
            passed: 0,
            refused: 0,
            failures: Vec::new(),
        }
    }

    /// Counts one case.
    pub fn record(&mut self, outcome: CaseOutcome) {
        match outcome {
            CaseOutcome::Passed => self.passed += 1,
            CaseOutcome::Refused => self.refused += 1,
            CaseOutcome::Failed(why) => self.failures.push(why),
        }
    }

    /// Every case counted.
    pub fn cases(&self) -> usize {
        self.passed + self.refused + self.failures.len()
    }

    /// True when no case failed and at least one ran.
    pub fn ok(&self) -> bool {
        self.failures.is_empty() && self.cases() > 0
    }
}

/// A failed power-on self-test: which suite, and the first failing case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cryptographic power-on self-test failed in {suite}: {case}")]
pub struct SelfTestFailure {
    /// The suite that failed.
    pub suite: &'static str,
    /// The first failing case.
    pub case: String,
}

/// The power-on suites: AES-256-GCM, HKDF-SHA256 and wire-format known answers.
pub fn power_on_reports() -> Vec<SuiteReport> {
    vec![
        kat::aes_gcm_power_on(),
        kat::hkdf_power_on(),
        kat::wire_format_power_on(),
    ]
}

/// Runs the power-on self-test. Fast (well under a millisecond of crypto); the server calls it
/// before opening its data directory and refuses to start if it fails.
pub fn power_on() -> Result<(), SelfTestFailure> {
    first_failure(&power_on_reports())
}

/// Every suite: the power-on set, RFC 5869 A.1–A.3, Wycheproof AES-GCM and HKDF-SHA256, and
/// our own vector files.
pub fn full() -> Vec<SuiteReport> {
    let mut reports = power_on_reports();
    reports.push(kat::rfc5869());
    reports.push(wycheproof::aes_gcm());
    reports.push(wycheproof::hkdf_sha256());
    reports.extend(vectors::run_all());
    // Searchable columns: RFC 5297 AES-SIV and the blind-index and deterministic vectors.
    reports.push(searchable::rfc5297());
    reports.extend(searchable::vectors());
    reports
}

/// The first failure in a set of reports, if any (an empty suite counts as a failure).
pub fn first_failure(reports: &[SuiteReport]) -> Result<(), SelfTestFailure> {
    for report in reports {
        if let Some(case) = report.failures.first() {
            return Err(SelfTestFailure {
                suite: report.suite,
                case: case.clone(),
            });
        }
        if report.cases() == 0 {
            return Err(SelfTestFailure {
                suite: report.suite,
                case: "no case ran".into(),
            });
        }
    }
    Ok(())
}

/// A printable table of reports: suite, cases, passed, refused, failed, result; then the
/// failed cases.
pub struct Table<'a>(pub &'a [SuiteReport]);

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .0
            .iter()
            .map(|r| r.suite.len())
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(
            f,
            "{:<width$}  {:>6}  {:>6}  {:>7}  {:>6}  result",
            "suite", "cases", "passed", "refused", "failed"
        )?;
        for r in self.0 {
            writeln!(
                f,
                "{:<width$}  {:>6}  {:>6}  {:>7}  {:>6}  {}",
                r.suite,
                r.cases(),
                r.passed,
                r.refused,
                r.failures.len(),
                if r.ok() { "ok" } else { "FAILED" }
            )?;
        }
        let total = |g: fn(&SuiteReport) -> usize| self.0.iter().map(g).sum::<usize>();
        writeln!(
            f,
            "{:<width$}  {:>6}  {:>6}  {:>7}  {:>6}  {}",
            "total",
            total(SuiteReport::cases),
            total(|r| r.passed),
            total(|r| r.refused),
            total(|r| r.failures.len()),
            if self.0.iter().all(SuiteReport::ok) {
                "ok"
            } else {
                "FAILED"
            }
        )?;
        for r in self.0 {
            for failure in &r.failures {
                writeln!(f, "FAILED {}: {failure}", r.suite)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_on_passes() {
        power_on().unwrap();
    }

    #[test]
    fn full_passes_and_counts() {
        let reports = full();
        first_failure(&reports).unwrap();
        let table = Table(&reports).to_string();
        assert!(table.contains("Wycheproof AES-GCM"));
        assert!(table.lines().last().unwrap().ends_with("ok"));
    }

    #[test]
    fn a_failure_is_reported_with_its_suite() {
        let mut report = SuiteReport::new("demo");
        report.record(CaseOutcome::Passed);
        report.record(CaseOutcome::Failed("case 7: tag differs".into()));
        let err = first_failure(&[report.clone()]).unwrap_err();
        assert_eq!(err.suite, "demo");
        assert!(err.to_string().contains("case 7"));
        assert!(Table(&[report]).to_string().contains("FAILED demo: case 7"));
        assert!(first_failure(&[SuiteReport::new("empty")]).is_err());
    }
}
