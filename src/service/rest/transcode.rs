//! JSON ↔ protobuf for the HTTP/JSON gateway, in protobuf's canonical JSON mapping (bytes as
//! base64, 64-bit integers as strings, enums by name, lowerCamelCase names emitted and both
//! spellings accepted) through prost-reflect over our own descriptor set: nothing is
//! hand-written per message, so a field added to a proto is on the HTTP surface at once.
//!
//! A request becomes exactly the protobuf message a gRPC client would send: the JSON body
//! (POST) or the query string (GET), plus the fields the path binds. Unknown fields are
//! refused, as the gRPC codec refuses them.

use prost::Message as _;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, Kind, MessageDescriptor};
use serde_json::{Map, Value};

use super::routes::{Matched, Method, Route};

/// A request the gateway refuses before any call is made (answered INVALID_ARGUMENT).
#[derive(Debug)]
pub struct BadRequest(pub String);

/// The input and output message descriptors of `route`'s RPC.
pub fn messages(
    pool: &DescriptorPool,
    route: &Route,
) -> Option<(MessageDescriptor, MessageDescriptor)> {
    let service = pool.get_service_by_name(route.service)?;
    let method = service.methods().find(|m| m.name() == route.rpc)?;
    Some((method.input(), method.output()))
}

/// The protobuf encoding of the request `matched`, `query` and `body` describe.
pub fn request(
    input: &MessageDescriptor,
    matched: &Matched<'_>,
    query: Option<&str>,
    body: &[u8],
) -> Result<Vec<u8>, BadRequest> {
    let blank = |b: &[u8]| b.iter().all(u8::is_ascii_whitespace);
    let query = query.unwrap_or("");
    let mut fields = match matched.route.method {
        Method::Post => {
            if !query.is_empty() {
                return Err(BadRequest(
                    "this method takes its fields from the JSON body, not the query string".into(),
                ));
            }
            if blank(body) {
                Map::new()
            } else {
                match serde_json::from_slice::<Value>(body) {
                    Ok(Value::Object(map)) => map,
                    Ok(_) => {
                        return Err(BadRequest("the request body must be a JSON object".into()));
                    }
                    Err(e) => return Err(BadRequest(format!("the request body is not JSON: {e}"))),
                }
            }
        }
        Method::Get => {
            if !blank(body) {
                return Err(BadRequest("a GET request takes no body".into()));
            }
            query_fields(query)?
        }
    };
    for (name, raw) in &matched.bindings {
        let field = input
            .get_field_by_name(name)
            .ok_or_else(|| BadRequest(format!("the route binds an unknown field {name}")))?;
        if fields.contains_key(field.name()) || fields.contains_key(field.json_name()) {
            return Err(BadRequest(format!(
                "{name} is given by the path; leave it out of the request"
            )));
        }
        let value = match field.kind() {
            Kind::Uint32 => raw.parse::<u32>().map(Value::from).map_err(|_| {
                BadRequest(format!(
                    "the path's {name} must be a whole number, not {raw:?}"
                ))
            })?,
            _ => Value::String((*raw).to_owned()),
        };
        fields.insert(field.json_name().to_owned(), value);
    }
    let message = DynamicMessage::deserialize_with_options(
        input.clone(),
        Value::Object(fields),
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| BadRequest(format!("invalid {}: {e}", input.name())))?;
    Ok(message.encode_to_vec())
}

/// The query string's fields as JSON strings (the canonical mapping accepts numbers and
/// timestamps as strings). A field given twice is refused.
fn query_fields(query: &str) -> Result<Map<String, Value>, BadRequest> {
    let mut fields = Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (key, value) = (form_decode(key)?, form_decode(value)?);
        if fields.insert(key.clone(), Value::String(value)).is_some() {
            return Err(BadRequest(format!(
                "the query parameter {key} is given twice"
            )));
        }
    }
    Ok(fields)
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space).
fn form_decode(text: &str) -> Result<String, BadRequest> {
    let spaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| BadRequest("the query string is not UTF-8 once percent-decoded".into()))
}

/// Why a gRPC answer could not be rendered as JSON (the server's own fault).
#[derive(Debug)]
pub struct BadAnswer(pub String);

/// The canonical JSON of one unary gRPC response body (one length-prefixed, uncompressed
/// message). Fields without presence are emitted even when they hold their default value
/// (the mapping's "emit defaults" option), so a client sees `"ok": false` rather than no
/// field at all.
pub fn response(output: &MessageDescriptor, body: &[u8]) -> Result<Vec<u8>, BadAnswer> {
    let (flag, rest) = body
        .split_first()
        .ok_or_else(|| BadAnswer("an empty response body".into()))?;
    let (length, message) = rest
        .split_at_checked(4)
        .ok_or_else(|| BadAnswer("a truncated response prefix".into()))?;
    let length = <[u8; 4]>::try_from(length)
        .map(u32::from_be_bytes)
        .map_err(|_| BadAnswer("a truncated response prefix".into()))?;
    if *flag != 0 || usize::try_from(length).ok() != Some(message.len()) {
        return Err(BadAnswer(
            "a response that is not one uncompressed message".into(),
        ));
    }
    let message = DynamicMessage::decode(output.clone(), message)
        .map_err(|e| BadAnswer(format!("an undecodable response: {e}")))?;
    let mut out = serde_json::Serializer::new(Vec::new());
    message
        .serialize_with_options(
            &mut out,
            &prost_reflect::SerializeOptions::new().skip_default_fields(false),
        )
        .map_err(|e| BadAnswer(format!("a response that does not render as JSON: {e}")))?;
    Ok(out.into_inner())
}

/// `message` framed as one gRPC length-prefixed message (uncompressed), or `None` when it is
/// longer than a frame can announce (the guard refuses it as over the limit long before).
pub fn frame(message: &[u8]) -> Option<Vec<u8>> {
    let length = u32::try_from(message.len()).ok()?;
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(message);
    Some(framed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::rest::routes;

    fn pool() -> DescriptorPool {
        DescriptorPool::decode(crate::service::server::FILE_DESCRIPTOR_SET).unwrap()
    }

    fn encode(
        method: &str,
        path: &str,
        query: Option<&str>,
        body: &str,
    ) -> Result<Vec<u8>, BadRequest> {
        let pool = pool();
        let matched = routes::find(method, path).unwrap();
        let (input, _) = messages(&pool, matched.route).unwrap();
        request(&input, &matched, query, body.as_bytes())
    }

    #[test]
    fn json_becomes_the_grpc_message() {
        let bytes = encode(
            "POST",
            "/v1/tenants/acme:encrypt",
            None,
            r#"{"context":"crm.email","plaintext":"aGk=","allEnabledVersions":true,"blind_indexes":["e"]}"#,
        )
        .unwrap();
        let decoded = crate::pb::EncryptRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.tenant_id, "acme");
        assert_eq!(decoded.context, "crm.email");
        assert_eq!(decoded.plaintext, b"hi");
        assert!(decoded.all_enabled_versions);
        assert_eq!(decoded.blind_indexes, ["e"]);

        let bytes = encode("POST", "/v1/tenants/acme/keyVersions/7:disable", None, "").unwrap();
        let decoded = crate::pb::DisableKeyVersionRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!((decoded.tenant_id.as_str(), decoded.version), ("acme", 7));

        let bytes = encode(
            "GET",
            "/v1/tenants/acme/auditEvents",
            Some("operation=Encrypt&page_size=5&pageToken=a%2Bb&since=2026-01-01T00:00:00Z"),
            "",
        )
        .unwrap();
        let decoded = crate::pb::ListAuditEventsRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.operation, "Encrypt");
        assert_eq!(decoded.page_size, 5);
        assert_eq!(decoded.page_token, "a+b");
        assert_eq!(decoded.since.unwrap().seconds, 1_767_225_600);
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let refused = |method, path, query, body| encode(method, path, query, body).unwrap_err().0;
        assert!(refused("POST", "/v1/tenants/a:encrypt", None, "{").contains("not JSON"));
        assert!(refused("POST", "/v1/tenants/a:encrypt", None, "[1]").contains("JSON object"));
        assert!(refused("POST", "/v1/tenants/a:encrypt", None, r#"{"nope":1}"#).contains("nope"));
        assert!(
            refused(
                "POST",
                "/v1/tenants/a:encrypt",
                None,
                r#"{"plaintext":"%%"}"#
            )
            .contains("EncryptRequest")
        );
        assert!(
            refused("POST", "/v1/tenants/a:encrypt", None, r#"{"tenantId":"b"}"#).contains("path")
        );
        assert!(refused("POST", "/v1/tenants/a:encrypt", Some("x=1"), "{}").contains("query"));
        assert!(
            refused("POST", "/v1/tenants/a/keyVersions/x:enable", None, "")
                .contains("whole number")
        );
        assert!(
            refused("GET", "/v1/tenants", Some("page_size=1&page_size=2"), "").contains("twice")
        );
        assert!(
            refused("GET", "/v1/tenants", Some("page_size=ten"), "").contains("ListTenantsRequest")
        );
        assert!(refused("GET", "/v1/tenants", None, "{}").contains("no body"));
    }

    #[test]
    fn answers_render_as_canonical_json() {
        let pool = pool();
        let (_, output) = messages(
            &pool,
            routes::find("POST", "/v1/auditChain:verify").unwrap().route,
        )
        .unwrap();
        let answer = crate::pb::VerifyAuditChainResponse {
            records_checked: 12,
            ..Default::default()
        };
        let json = response(&output, &frame(&answer.encode_to_vec()).unwrap()).unwrap();
        let json: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"ok": false, "recordsChecked": "12", "firstBadSeq": "0"})
        );
        assert!(response(&output, &[1, 0, 0, 0, 0]).is_err(), "compressed");
        assert!(response(&output, &[0, 0, 0, 0, 9]).is_err(), "short");
    }
}
