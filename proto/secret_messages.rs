// Messages that carry plaintext or key bytes: code generated from the protos gives them no
// `Debug`, so they cannot be printed by accident (a `{:?}` of a request would leak the value).
// Included by the server's build.rs and by the Rust client's (clients/rust/build.rs): one list.
&[
    "tenantkms.v1.EncryptRequest",
    "tenantkms.v1.DecryptResponse",
    "tenantkms.v1.EncryptBatchItem",
    "tenantkms.v1.EncryptBatchRequest",
    "tenantkms.v1.DecryptBatchResult",
    "tenantkms.v1.DecryptBatchResponse",
    "tenantkms.v1.GenerateDataKeyResponse",
    "tenantkms.v1.DecryptDataKeyResponse",
    // Searchable columns: the values whose blind indexes are computed.
    "tenantkms.v1.ComputeBlindIndexRequest",
]
