//! `tenantkms.v1.BenchService`: the transport baseline of `tenant-kms bench`.
//!
//! Served only when `serve` runs with the hidden `--bench-echo` flag. `Echo` does no work: it
//! does not authenticate, touch a key, or write an audit record. It answers with zero-filled
//! payloads of the size a real call of the same shape would return, through the same tonic
//! stack, layers and message limits as the real services, so `bench` can divide a real RPC's
//! throughput by the transport's ceiling.

use tonic::{Request, Response, Status};

use crate::pb;
use crate::pb::bench_service_server::BenchService;

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
