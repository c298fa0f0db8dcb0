//! `tenantkms.bench.v1.BenchService`: the transport baseline of the bench.
//!
//! Served only by this crate's `tenant-kms-bench serve` (never by the product's `tenant-kms
//! serve`, which does not compile it). `Echo` does no work: it
//! does not authenticate, touch a key, or write an audit record. It answers with zero-filled
//! payloads of the size a real call of the same shape would return, through the same tonic
//! stack, layers and message limits as the real services, so `bench` can divide a real RPC's
//! throughput by the transport's ceiling.

use tenant_kms::service::AppState;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::pb;
use crate::pb::bench_service_server::{BenchService, BenchServiceServer};

/// Largest payload one echo result may carry (the real services' field limit is far lower).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// The empty-work echo service.
#[derive(Debug, Default, Clone, Copy)]
pub struct EchoService;

#[tonic::async_trait]
impl BenchService for EchoService {
    async fn echo(
        &self,
        request: Request<pb::EchoRequest>,
    ) -> Result<Response<pb::EchoResponse>, Status> {
        let req = request.into_inner();
        let size = (req.response_bytes as usize).min(MAX_RESPONSE_BYTES);
        let results = req
            .items
            .iter()
            .map(|_| pb::EchoResult {
                output: Some(pb::EchoOutput {
                    ciphertext: vec![0; size],
                    key_version: 1,
                }),
            })
            .collect();
        let ciphertext = if req.items.is_empty() {
            vec![0; size]
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::EchoResponse {
            ciphertext,
            key_version: 1,
            results,
        }))
    }
}

/// The routes that add the echo service to the product's server (for
/// `tenant_kms::cli::serve::run_with`), with the real services' message size limits.
pub fn routes(state: &AppState) -> Routes {
    let max = state.options.limits.max_message_bytes;
    Routes::new(
        BenchServiceServer::new(EchoService)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    )
}
