//! Seals stdin into an envelope on stdout, or opens one, through a tenant-kms server named by
//! the environment (`TENANT_KMS_ADDR`, `TENANT_KMS_TOKEN`, … as `ClientConfig::from_env`).
//! The Python package's interoperability test runs it against a real server.
//!
//! ```text
//! cargo run --release -p tenant-kms-client --example envelope -- encrypt TENANT CONTEXT < in > out
//! cargo run --release -p tenant-kms-client --example envelope -- decrypt TENANT CONTEXT < out
//! ```

use std::io::{Read, Write};
use std::process::ExitCode;

use tenant_kms_client::ClientConfig;
use tenant_kms_client::envelope::Envelope;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [verb, tenant, context] = args.as_slice() else {
        eprintln!("usage: envelope encrypt|decrypt TENANT CONTEXT < input > output");
        return ExitCode::from(2);
    };
    match run(verb, tenant, context).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("envelope: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(verb: &str, tenant: &str, context: &str) -> Result<(), tenant_kms_client::Error> {
    let envelope = Envelope::new(ClientConfig::from_env()?.connect().await?);
    let stdout = std::io::stdout();
    match verb {
        "encrypt" => {
            // stdin's length is not known up front: the writer streams it as it comes.
            let mut writer = envelope
                .encryptor(tenant, context, stdout.lock(), None)
                .await?;
            std::io::copy(&mut std::io::stdin().lock(), &mut writer)?;
            writer.finish()?.flush()?;
        }
        "decrypt" => {
            let mut input = Vec::new();
            std::io::stdin().read_to_end(&mut input)?;
            let plaintext = envelope.decrypt_value(tenant, context, &input).await?;
            let mut out = stdout.lock();
            out.write_all(&plaintext)?;
            out.flush()?;
        }
        other => {
            return Err(tenant_kms_client::Error::Config(format!(
                "unknown verb {other:?} (encrypt or decrypt)"
            )));
        }
    }
    Ok(())
}
