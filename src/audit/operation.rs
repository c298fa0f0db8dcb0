//! The names of audited operations.
//!
//! Every name written to an audit record, or matched in one, is an [`Operation`]: the gRPC
//! calls (named as the RPC), and what the commands and the service do by themselves. The
//! names are stored in `audit.db` and covered by the chain MAC, so [`Operation::as_str`] must
//! never change for an existing variant: old records must still verify and still match a
//! query by operation. A record read back keeps its operation as the stored string
//! ([`super::AuditRecord::operation`]), so a name this build does not know (a newer build's,
//! or an intruder's) still reads, verifies or fails like any other.

/// An audited operation, with its exact stored name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    // The RPCs (`tenantkms.v1`), named as the RPC.
    /// `KeyService.Encrypt`.
    Encrypt,
    /// `KeyService.Decrypt`.
    Decrypt,
    /// `KeyService.EncryptBatch`.
    EncryptBatch,
    /// `KeyService.DecryptBatch`.
    DecryptBatch,
    /// `KeyService.GenerateDataKey`.
    GenerateDataKey,
    /// `KeyService.DecryptDataKey`.
    DecryptDataKey,
    /// `KeyService.Rewrap`.
    Rewrap,
    /// `KeyService.RewrapBatch`.
    RewrapBatch,
    /// `TenantService.CreateTenant`.
    CreateTenant,
    /// `TenantService.GetTenant`.
    GetTenant,
    /// `TenantService.ListTenants`.
    ListTenants,
    /// `TenantService.RotateTenantKey`; also a rotation by `rotate` or the nonce budget.
    RotateTenantKey,
    /// `TenantService.ListKeyVersions`.
    ListKeyVersions,
    /// `TenantService.DisableKeyVersion`.
    DisableKeyVersion,
    /// `TenantService.EnableKeyVersion`.
    EnableKeyVersion,
    /// `TenantService.DestroyKeyVersion`.
    DestroyKeyVersion,
    /// `TenantService.SetRotationPolicy`.
    SetRotationPolicy,
    /// `TenantService.SuspendTenant`.
    SuspendTenant,
    /// `TenantService.ResumeTenant`.
    ResumeTenant,
    /// `TenantService.ScheduleTenantDeletion`.
    ScheduleTenantDeletion,
    /// `TenantService.CancelTenantDeletion`.
    CancelTenantDeletion,
    /// `AuditService.ListAuditEvents`.
    ListAuditEvents,
    /// `AuditService.VerifyAuditChain`.
    VerifyAuditChain,
    // What commands and the service do by themselves.
    /// A tenant destroyed when its deletion window passed (`rotate`, the server's reaper).
    DestroyTenant,
    /// `rotate --master`: a new master-key version.
    RotateMasterKey,
    /// `rotate --master`: tenant keys re-wrapped under the new master version.
    RewrapTenantKeys,
    /// `rotate --master`: an old master version retired.
    RetireMasterKey,
    /// `token create`.
    TokenCreate,
    /// `token revoke`.
    TokenRevoke,
    /// `backup`.
    Backup,
    /// `restore`.
    Restore,
    /// `tenant export`.
    TenantExport,
    /// `tenant import`.
    TenantImport,
    /// `audit prune`.
    AuditPrune,
    /// `audit recover`: a recovery record acknowledging breaks.
    AuditRecover,
    /// Evidence the writer appends when the end of the log is not the one it signed.
    AuditTailMismatch,
    /// A destroyed tenant or version shredded again from the shred ledger at start.
    ShredLedgerReapply,
    /// A destruction found in the key store and recorded in the shred ledger at start.
    ShredLedgerRecord,
}

impl Operation {
    /// Every operation, in declaration order.
    pub const ALL: &'static [Operation] = &[
        Operation::Encrypt,
        Operation::Decrypt,
        Operation::EncryptBatch,
        Operation::DecryptBatch,
        Operation::GenerateDataKey,
        Operation::DecryptDataKey,
        Operation::Rewrap,
        Operation::RewrapBatch,
        Operation::CreateTenant,
        Operation::GetTenant,
        Operation::ListTenants,
        Operation::RotateTenantKey,
        Operation::ListKeyVersions,
        Operation::DisableKeyVersion,
        Operation::EnableKeyVersion,
        Operation::DestroyKeyVersion,
        Operation::SetRotationPolicy,
        Operation::SuspendTenant,
        Operation::ResumeTenant,
        Operation::ScheduleTenantDeletion,
        Operation::CancelTenantDeletion,
        Operation::ListAuditEvents,
        Operation::VerifyAuditChain,
        Operation::DestroyTenant,
        Operation::RotateMasterKey,
        Operation::RewrapTenantKeys,
        Operation::RetireMasterKey,
        Operation::TokenCreate,
        Operation::TokenRevoke,
        Operation::Backup,
        Operation::Restore,
        Operation::TenantExport,
        Operation::TenantImport,
        Operation::AuditPrune,
        Operation::AuditRecover,
        Operation::AuditTailMismatch,
        Operation::ShredLedgerReapply,
        Operation::ShredLedgerRecord,
    ];

    /// The stored name: fixed forever for each variant (see the module doc).
    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::Encrypt => "Encrypt",
            Operation::Decrypt => "Decrypt",
            Operation::EncryptBatch => "EncryptBatch",
            Operation::DecryptBatch => "DecryptBatch",
            Operation::GenerateDataKey => "GenerateDataKey",
            Operation::DecryptDataKey => "DecryptDataKey",
            Operation::Rewrap => "Rewrap",
            Operation::RewrapBatch => "RewrapBatch",
            Operation::CreateTenant => "CreateTenant",
            Operation::GetTenant => "GetTenant",
            Operation::ListTenants => "ListTenants",
            Operation::RotateTenantKey => "RotateTenantKey",
            Operation::ListKeyVersions => "ListKeyVersions",
            Operation::DisableKeyVersion => "DisableKeyVersion",
            Operation::EnableKeyVersion => "EnableKeyVersion",
            Operation::DestroyKeyVersion => "DestroyKeyVersion",
            Operation::SetRotationPolicy => "SetRotationPolicy",
            Operation::SuspendTenant => "SuspendTenant",
            Operation::ResumeTenant => "ResumeTenant",
            Operation::ScheduleTenantDeletion => "ScheduleTenantDeletion",
            Operation::CancelTenantDeletion => "CancelTenantDeletion",
            Operation::ListAuditEvents => "ListAuditEvents",
            Operation::VerifyAuditChain => "VerifyAuditChain",
            Operation::DestroyTenant => "DestroyTenant",
            Operation::RotateMasterKey => "RotateMasterKey",
            Operation::RewrapTenantKeys => "RewrapTenantKeys",
            Operation::RetireMasterKey => "RetireMasterKey",
            Operation::TokenCreate => "TokenCreate",
            Operation::TokenRevoke => "TokenRevoke",
            Operation::Backup => "Backup",
            Operation::Restore => "Restore",
            Operation::TenantExport => "TenantExport",
            Operation::TenantImport => "TenantImport",
            Operation::AuditPrune => "AuditPrune",
            Operation::AuditRecover => "AuditRecover",
            Operation::AuditTailMismatch => "AuditTailMismatch",
            Operation::ShredLedgerReapply => "ShredLedgerReapply",
            Operation::ShredLedgerRecord => "ShredLedgerRecord",
        }
    }

    /// The operation a stored name names, if this build knows it.
    pub fn parse(name: &str) -> Option<Operation> {
        Operation::ALL
            .iter()
            .copied()
            .find(|op| op.as_str() == name)
    }

    /// Whether a stored name is this operation's.
    pub fn is(self, name: &str) -> bool {
        self.as_str() == name
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_parse_back() {
        let mut seen = std::collections::HashSet::new();
        for op in Operation::ALL {
            assert!(seen.insert(op.as_str()), "{op:?} repeats a name");
            assert_eq!(Operation::parse(op.as_str()), Some(*op));
        }
        assert_eq!(Operation::parse("encrypt"), None);
    }

    #[test]
    fn stored_names_never_change() {
        // Names already in audit logs: a change would break their MACs and queries.
        for (op, name) in [
            (Operation::Encrypt, "Encrypt"),
            (Operation::RotateTenantKey, "RotateTenantKey"),
            (Operation::DestroyTenant, "DestroyTenant"),
            (Operation::AuditRecover, "AuditRecover"),
            (Operation::AuditTailMismatch, "AuditTailMismatch"),
            (Operation::ShredLedgerReapply, "ShredLedgerReapply"),
            (Operation::TokenCreate, "TokenCreate"),
        ] {
            assert_eq!(op.as_str(), name);
        }
    }
}
