//! The names of audited operations.
//!
//! Every name written to an audit record, or matched in one, is an [`Operation`]: a gRPC call
//! ([`Rpc`], named as the RPC; the authorization layer uses the same type as
//! `crate::auth::Operation`) or something a command or the service does by itself. The names
//! are stored in `audit.db` and covered by the chain MAC, so [`Operation::as_str`] must never
//! change for an existing variant: old records must still verify and still match a query by
//! operation. A record read back keeps its operation as the stored string
//! ([`super::AuditRecord::operation`]), so a name this build does not know (a newer build's,
//! or an intruder's) still reads, verifies or fails like any other.

/// Declares a fieldless enum from one list of `Variant => "stored name"` lines, with `ALL`
/// (every variant, in order) and `stored_name`: one list, so a variant cannot be left out of
/// either.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[doc = $doc:literal])* $variant:ident => $stored:literal, )*
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The stored name: fixed forever for each variant (see the module doc).
            pub const fn stored_name(self) -> &'static str {
                match self {
                    $($name::$variant => $stored,)*
                }
            }
        }
    };
}

named_enum! {
    /// A gRPC call of `tenantkms.v1`, as authorized and audited.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Rpc {
        /// `KeyService.Encrypt`.
        Encrypt => "Encrypt",
        /// `KeyService.Decrypt`.
        Decrypt => "Decrypt",
        /// `KeyService.EncryptBatch`.
        EncryptBatch => "EncryptBatch",
        /// `KeyService.DecryptBatch`.
        DecryptBatch => "DecryptBatch",
        /// `KeyService.GenerateDataKey`.
        GenerateDataKey => "GenerateDataKey",
        /// `KeyService.DecryptDataKey`.
        DecryptDataKey => "DecryptDataKey",
        /// `KeyService.Rewrap`.
        Rewrap => "Rewrap",
        /// `KeyService.RewrapBatch`.
        RewrapBatch => "RewrapBatch",
        /// `KeyService.GenerateDataKeyWithoutPlaintext`.
        GenerateDataKeyWithoutPlaintext => "GenerateDataKeyWithoutPlaintext",
        /// `TenantService.CreateTenant`.
        CreateTenant => "CreateTenant",
        /// `TenantService.GetTenant`.
        GetTenant => "GetTenant",
        /// `TenantService.ListTenants`.
        ListTenants => "ListTenants",
        /// `TenantService.RotateTenantKey`.
        RotateTenantKey => "RotateTenantKey",
        /// `TenantService.ListKeyVersions`.
        ListKeyVersions => "ListKeyVersions",
        /// `TenantService.DisableKeyVersion`.
        DisableKeyVersion => "DisableKeyVersion",
        /// `TenantService.EnableKeyVersion`.
        EnableKeyVersion => "EnableKeyVersion",
        /// `TenantService.DestroyKeyVersion`.
        DestroyKeyVersion => "DestroyKeyVersion",
        /// `TenantService.SetRotationPolicy`.
        SetRotationPolicy => "SetRotationPolicy",
        /// `TenantService.SuspendTenant`.
        SuspendTenant => "SuspendTenant",
        /// `TenantService.ResumeTenant`.
        ResumeTenant => "ResumeTenant",
        /// `TenantService.ScheduleTenantDeletion`.
        ScheduleTenantDeletion => "ScheduleTenantDeletion",
        /// `TenantService.CancelTenantDeletion`.
        CancelTenantDeletion => "CancelTenantDeletion",
        /// `AuditService.ListAuditEvents`.
        ListAuditEvents => "ListAuditEvents",
        /// `AuditService.VerifyAuditChain`.
        VerifyAuditChain => "VerifyAuditChain",
        /// `KeyService.ComputeBlindIndex` (its record names the index as `blind-index:NAME`).
        ComputeBlindIndex => "ComputeBlindIndex",
        /// `KeyService.Encrypt` with `deterministic` set (AES-256-SIV): its own name, so the
        /// audit and token scopes tell equality-revealing encryption apart.
        EncryptDeterministic => "EncryptDeterministic",
        /// `KeyService.EncryptBatch` with `deterministic` set.
        EncryptBatchDeterministic => "EncryptBatchDeterministic",
        /// `TenantService.DeclareBlindIndex`.
        DeclareBlindIndex => "DeclareBlindIndex",
        /// `TenantService.ListBlindIndexes`.
        ListBlindIndexes => "ListBlindIndexes",
        /// `TenantService.QuarantineToken` (issue 16).
        QuarantineToken => "QuarantineToken",
        /// `TenantService.ReleaseToken`.
        ReleaseToken => "ReleaseToken",
        /// `TenantService.ContainToken`.
        ContainToken => "ContainToken",
        /// `AuditService.GetUsage`.
        GetUsage => "GetUsage",
    }
}

impl Rpc {
    /// The RPC name, as stored in audit records.
    pub const fn name(self) -> &'static str {
        self.stored_name()
    }

    /// Whether the RPC opens ciphertext or a wrapped data key (Decrypt, DecryptBatch,
    /// DecryptDataKey): the calls the usage counters and the anomaly detectors count as
    /// decryptions. The one list of them.
    pub const fn opens_ciphertext(self) -> bool {
        matches!(self, Rpc::Decrypt | Rpc::DecryptBatch | Rpc::DecryptDataKey)
    }
}

named_enum! {
    /// What commands and the service do by themselves, apart from RPCs.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Task {
        /// A tenant destroyed when its deletion window passed (`rotate`, the server's reaper).
        DestroyTenant => "DestroyTenant",
        /// `rotate --master`: a new master-key version.
        RotateMasterKey => "RotateMasterKey",
        /// `rotate --master`: tenant keys re-wrapped under the new master version.
        RewrapTenantKeys => "RewrapTenantKeys",
        /// `rotate --master`: an old master version retired.
        RetireMasterKey => "RetireMasterKey",
        /// `token create`.
        TokenCreate => "TokenCreate",
        /// `token revoke`.
        TokenRevoke => "TokenRevoke",
        /// `token quarantine`, `token contain`, or a detector configured to quarantine: the
        /// token is refused until released (issue 16).
        TokenQuarantine => "TokenQuarantine",
        /// `token release`: a quarantined token is served again.
        TokenRelease => "TokenRelease",
        /// `backup`.
        Backup => "Backup",
        /// `restore`.
        Restore => "Restore",
        /// `tenant export`.
        TenantExport => "TenantExport",
        /// `tenant import`.
        TenantImport => "TenantImport",
        /// `audit prune`.
        AuditPrune => "AuditPrune",
        /// `audit recover`: a recovery record acknowledging breaks.
        AuditRecover => "AuditRecover",
        /// `audit recover --new-log`: the first record of a deliberately new log (the old
        /// one moved aside as evidence).
        AuditNewLog => "AuditNewLog",
        /// Evidence the writer appends when the end of the log is not the one it signed.
        AuditTailMismatch => "AuditTailMismatch",
        /// `keyring init-hsm-key`: a root key generated in a PKCS#11 token.
        CreateRootKey => "CreateRootKey",
        /// `keyring seal`: a plain keyring sealed under a root of trust.
        SealKeyring => "SealKeyring",
        /// `keyring reseal`: a sealed keyring re-sealed under another root.
        ResealKeyring => "ResealKeyring",
        /// `keyring unseal`: a sealed keyring written out in plain text (export-controlled).
        UnsealKeyring => "UnsealKeyring",
        /// A destroyed tenant or version shredded again from the shred ledger at start.
        ShredLedgerReapply => "ShredLedgerReapply",
        /// A destruction found in the key store and recorded in the shred ledger at start.
        ShredLedgerRecord => "ShredLedgerRecord",
        /// A tenant creation found in the key store at start with no audit record (a crash
        /// between the two commits), recorded then (docs/AUDIT.md).
        ReconciledTenantCreate => "ReconciledTenantCreate",
        /// A new key version found in the key store at start with no audit record,
        /// recorded then (docs/AUDIT.md).
        ReconciledKeyVersion => "ReconciledKeyVersion",
        /// The key store's rows MAC'd for the first time (the schema upgrade to row MACs,
        /// `store::row_auth`): recorded so that a later request for the same upgrade (a
        /// key store rewritten into its pre-upgrade form) is refused.
        RowMacUpgrade => "RowMacUpgrade",
        /// The key store's row-anchor write counter as it stood after a key-store change (or
        /// after a restore): a start whose key store is behind the latest such record is
        /// refused as a rollback (docs/AUDIT.md, "Key-store anchors").
        KeyStoreAnchor => "KeyStoreAnchor",
        /// Calls from one peer refused because they proved no identity (no, an unknown or a
        /// malformed credential), aggregated: the first of a window at once, then one record
        /// per window whose item count is the number of further refusals (issue 13).
        UnauthenticatedRefusals => "UnauthenticatedRefusals",
        /// Requests from one peer refused because they were larger than the message limit,
        /// before any handler or authentication ran; aggregated like
        /// [`Task::UnauthenticatedRefusals`].
        OversizeRequestRefusals => "OversizeRequestRefusals",
        /// A detector found unusual key use (`crate::detect`): the record names the
        /// detector (as the context `detector:NAME`), the caller, the tenant and the figures
        /// that tripped it, and any containment applied (issue 16).
        Anomaly => "Anomaly",
    }
}

/// An audited operation, with its exact stored name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// A gRPC call; [`Rpc::RotateTenantKey`] also names a rotation by `rotate` or the nonce
    /// budget.
    Rpc(Rpc),
    /// Something a command or the service did by itself.
    Task(Task),
}

impl Operation {
    /// The stored name: fixed forever for each variant (see the module doc).
    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::Rpc(rpc) => rpc.stored_name(),
            Operation::Task(task) => task.stored_name(),
        }
    }

    /// Every operation: the RPCs, then the tasks.
    pub fn all() -> impl Iterator<Item = Operation> {
        let rpcs = Rpc::ALL.iter().map(|rpc| Operation::Rpc(*rpc));
        rpcs.chain(Task::ALL.iter().map(|task| Operation::Task(*task)))
    }

    /// The operation a stored name names, if this build knows it.
    pub fn parse(name: &str) -> Option<Operation> {
        Operation::all().find(|op| op.as_str() == name)
    }

    /// Whether a stored name is this operation's.
    pub fn is(self, name: &str) -> bool {
        self.as_str() == name
    }
}

impl From<Rpc> for Operation {
    fn from(rpc: Rpc) -> Self {
        Operation::Rpc(rpc)
    }
}

impl From<Task> for Operation {
    fn from(task: Task) -> Self {
        Operation::Task(task)
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
        for op in Operation::all() {
            assert!(seen.insert(op.as_str()), "{op:?} repeats a name");
            assert_eq!(Operation::parse(op.as_str()), Some(op));
        }
        assert_eq!(seen.len(), Rpc::ALL.len() + Task::ALL.len());
        assert_eq!(Operation::parse("encrypt"), None);
    }

    #[test]
    fn stored_names_never_change() {
        // Names already in audit logs: a change would break their MACs and queries.
        for (op, name) in [
            (Operation::Rpc(Rpc::Encrypt), "Encrypt"),
            (Operation::Rpc(Rpc::RotateTenantKey), "RotateTenantKey"),
            (Operation::Rpc(Rpc::VerifyAuditChain), "VerifyAuditChain"),
            (Operation::Task(Task::DestroyTenant), "DestroyTenant"),
            (Operation::Task(Task::AuditRecover), "AuditRecover"),
            (
                Operation::Task(Task::AuditTailMismatch),
                "AuditTailMismatch",
            ),
            (
                Operation::Task(Task::ShredLedgerReapply),
                "ShredLedgerReapply",
            ),
            (Operation::Task(Task::TokenCreate), "TokenCreate"),
            (
                Operation::Task(Task::UnauthenticatedRefusals),
                "UnauthenticatedRefusals",
            ),
            (
                Operation::Task(Task::OversizeRequestRefusals),
                "OversizeRequestRefusals",
            ),
            (Operation::Task(Task::Anomaly), "Anomaly"),
        ] {
            assert_eq!(op.as_str(), name);
        }
    }
}
