//! The gRPC codec of `tenantkms.v1`: prost encoding, plus a strict decoder that refuses
//! requests carrying fields this server does not know, instead of silently dropping them
//! (prost keeps no unknown fields).
//!
//! Detection: after decoding, the message is measured again (`encoded_len`). prost encodes
//! every field it knows canonically, so a request whose bytes are longer than its canonical
//! encoding carried something the server threw away: an unknown field (a client built against
//! a newer schema, or a typo'd field number), a known field repeated, or a default value
//! encoded explicitly. All of those are refused with INVALID_ARGUMENT: a security service
//! should not act on a request it only partly understood (a client that believes it set a
//! restriction the server does not know must hear so). The one false positive is a client
//! encoder that writes proto3 default values explicitly or uses non-minimal varints; the
//! official gRPC libraries do neither.
//!
//! Strictness applies to request messages only (the build script marks every RPC input type
//! [`Strictness::STRICT`]); responses decode leniently, so this crate's clients keep working
//! against a newer server that adds response fields. Malformed protobuf becomes
//! INVALID_ARGUMENT (the client's fault) rather than tonic's default INTERNAL.

use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};

use super::status;
use crate::error::Error;

/// Whether a message is decoded strictly; implemented by the build script for every RPC
/// input (`true`) and output (`false`) type of `tenantkms.v1`.
pub trait Strictness {
    /// Refuse bytes the message does not account for.
    const STRICT: bool;
}

/// The codec named in the generated service code (`codec_path`).
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Strictness + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(PhantomData)
    }
}

/// Decodes `U`, refusing unknown or non-canonical content when `U` is strict.
#[derive(Debug, Clone)]
pub struct StrictDecoder<U>(PhantomData<U>);

impl<U: Message + Default + Strictness> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let received = buf.remaining();
        let message = match U::decode(buf) {
            Ok(message) => message,
            Err(_) if U::STRICT => {
                return Err(status::to_status(
                    &Error::InvalidArgument("the request is not valid protobuf".into()),
                    "",
                ));
            }
            Err(e) => return Err(Status::internal(format!("undecodable response: {e}"))),
        };
        if U::STRICT && message.encoded_len() != received {
            return Err(status::to_status(
                &Error::InvalidArgument(
                    "the request carries fields this server does not use (unknown, repeated \
                     or explicitly default-valued): refused rather than ignored"
                        .into(),
                ),
                "",
            ));
        }
        Ok(Some(message))
    }
}
