//! The OpenAPI 3 document of the HTTP/JSON API, generated from the route table and the
//! descriptor set (messages, fields, and the protos' comments as descriptions), so it
//! describes exactly what the gateway serves. It is served at [`super::OPENAPI_PATH`] and kept
//! in the repository as `docs/openapi.json`; a test checks the two are equal.

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{DescriptorPool, FieldDescriptor, FileDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use super::routes::{self, Method, ROUTES};
use crate::error::{Error, Result};

/// The document as pretty-printed JSON with a final newline (the repository file's form).
pub fn document_text(pool: &DescriptorPool) -> Result<String> {
    let document = document(pool)?;
    serde_json::to_string_pretty(&document)
        .map(|text| text + "\n")
        .map_err(|e| Error::Internal(format!("OpenAPI document: {e}")))
}

/// The tenant id's syntax (`domain::TenantId`), stated for clients and generators.
const TENANT_ID_PATTERN: &str = "^[a-z0-9][a-z0-9_-]*$";

fn document(pool: &DescriptorPool) -> Result<Value> {
    let mut comments = Comments::default();
    let mut referenced = BTreeSet::new();
    let mut paths: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
    for route in ROUTES {
        let service = pool
            .get_service_by_name(route.service)
            .ok_or_else(|| Error::Internal(format!("no service {}", route.service)))?;
        let method = service
            .methods()
            .find(|m| m.name() == route.rpc)
            .ok_or_else(|| Error::Internal(format!("no RPC {}/{}", route.service, route.rpc)))?;
        let (input, output) = (method.input(), method.output());
        let bound = routes::path_fields(route.path);
        let mut parameters = Vec::new();
        for name in &bound {
            let field = input
                .get_field_by_name(name)
                .ok_or_else(|| Error::Internal(format!("{} binds no field {name}", route.path)))?;
            let mut schema = field_schema(&field, &mut referenced)?;
            if *name == "tenant_id" {
                schema = json!({
                    "type": "string", "minLength": 1, "maxLength": 64, "pattern": TENANT_ID_PATTERN,
                });
            }
            parameters.push(json!({
                "name": name, "in": "path", "required": true, "schema": schema,
                "description": comments.of_field(&field),
            }));
        }
        let free: Vec<FieldDescriptor> = input
            .fields()
            .filter(|f| !bound.contains(&f.name()))
            .collect();
        let mut operation = Map::new();
        let short = service.name();
        operation.insert(
            "operationId".into(),
            json!(format!("{short}_{}", route.rpc)),
        );
        operation.insert("tags".into(), json!([short]));
        let description = comments.at(&method.parent_file(), method.path());
        let summary = description.lines().next().unwrap_or(route.rpc).to_owned();
        operation.insert("summary".into(), json!(summary));
        operation.insert(
            "description".into(),
            json!(format!(
                "{description}\n\ngRPC: `{}/{}`.",
                route.service, route.rpc
            )),
        );
        match route.method {
            Method::Get => {
                for field in &free {
                    parameters.push(json!({
                        "name": field.name(), "in": "query", "required": false,
                        "schema": field_schema(field, &mut referenced)?,
                        "description": comments.of_field(field),
                    }));
                }
            }
            Method::Post => {
                let schema = object_schema(&input, &free, &mut comments, &mut referenced)?;
                operation.insert(
                    "requestBody".into(),
                    json!({
                        "required": false,
                        "description": format!(
                            "{} in protobuf's canonical JSON, without the fields the path gives.",
                            input.full_name()
                        ),
                        "content": {"application/json": {"schema": schema}},
                    }),
                );
            }
        }
        if !parameters.is_empty() {
            operation.insert("parameters".into(), Value::Array(parameters));
        }
        referenced.insert(output.full_name().to_owned());
        operation.insert(
            "responses".into(),
            json!({
                "200": {
                    "description": format!("{} in protobuf's canonical JSON.", output.full_name()),
                    "content": {"application/json": {"schema": reference(output.full_name())}},
                },
                "default": {"$ref": "#/components/responses/Error"},
            }),
        );
        paths.entry(route.path).or_default().insert(
            route.method.as_str().to_lowercase(),
            Value::Object(operation),
        );
    }
    let mut schemas = Map::new();
    let mut done = BTreeSet::new();
    while let Some(name) = referenced.iter().find(|n| !done.contains(*n)).cloned() {
        done.insert(name.clone());
        let message = pool
            .get_message_by_name(&name)
            .ok_or_else(|| Error::Internal(format!("no message {name}")))?;
        let fields: Vec<FieldDescriptor> = message.fields().collect();
        let schema = object_schema(&message, &fields, &mut comments, &mut referenced)?;
        schemas.insert(name, schema);
    }
    schemas.insert("google.rpc.Status".into(), status_schema());
    Ok(json!({
        "openapi": "3.0.3",
        "info": {
            "title": "tenant-kms HTTP/JSON API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Every RPC of tenant-kms's gRPC services (tenantkms.v1) as a \
                resource-style HTTP route, with bodies in protobuf's canonical JSON (bytes as \
                base64, 64-bit integers as strings, enums by name). The same port, TLS, bearer \
                tokens, authorization, audit records and admission limits as gRPC. Errors are a \
                google.rpc.Status in JSON under the HTTP status google.rpc.Code maps its code to.",
            "license": {"name": "Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A tenant-kms token (admin.token, or one made with `token create`).",
                },
            },
            "responses": {
                "Error": {
                    "description": "The call failed: a google.rpc.Status in JSON.",
                    "headers": {
                        "x-request-id": {"schema": {"type": "string"}, "description": "The id of the call in the server log and the audit record."},
                        "retry-after-ms": {"schema": {"type": "integer"}, "description": "With RESOURCE_EXHAUSTED: when a retry may succeed."},
                    },
                    "content": {"application/json": {"schema": reference("google.rpc.Status")}},
                },
            },
            "schemas": schemas,
        },
    }))
}

fn reference(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// The schema of a message restricted to `fields`: properties by JSON name, nothing else
/// (unknown fields are refused in requests, never emitted in answers).
fn object_schema(
    message: &MessageDescriptor,
    fields: &[FieldDescriptor],
    comments: &mut Comments,
    referenced: &mut BTreeSet<String>,
) -> Result<Value> {
    let mut properties = Map::new();
    for field in fields {
        let mut schema = field_schema(field, referenced)?;
        let description = comments.of_field(field);
        if !description.is_empty()
            && let Value::Object(map) = &mut schema
            && !map.contains_key("$ref")
        {
            map.insert("description".into(), json!(description));
        }
        properties.insert(field.json_name().to_owned(), schema);
    }
    let mut schema = json!({
        "type": "object",
        "properties": properties,
        "additionalProperties": false,
    });
    let description = comments.at(&message.parent_file(), message.path());
    if !description.is_empty()
        && let Value::Object(map) = &mut schema
    {
        map.insert("description".into(), json!(description));
    }
    Ok(schema)
}

/// A field's schema in the canonical JSON mapping.
fn field_schema(field: &FieldDescriptor, referenced: &mut BTreeSet<String>) -> Result<Value> {
    if field.is_map() {
        return Err(Error::Internal(format!(
            "{}: map fields have no HTTP mapping here yet",
            field.full_name()
        )));
    }
    let single = match field.kind() {
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "format": "byte"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX})
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            json!({"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"})
        }
        Kind::Uint64 | Kind::Fixed64 => {
            json!({"type": "string", "format": "uint64", "pattern": "^[0-9]+$"})
        }
        Kind::Float | Kind::Double => json!({"type": "number"}),
        Kind::Enum(e) => {
            let names: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
            json!({"type": "string", "enum": names})
        }
        Kind::Message(m) if m.full_name() == "google.protobuf.Timestamp" => {
            json!({"type": "string", "format": "date-time"})
        }
        Kind::Message(m) => {
            referenced.insert(m.full_name().to_owned());
            reference(m.full_name())
        }
    };
    Ok(if field.is_list() {
        json!({"type": "array", "items": single})
    } else {
        single
    })
}

/// `google.rpc.Status` in JSON: what every error answer carries.
fn status_schema() -> Value {
    json!({
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "integer", "format": "int32", "description": "The google.rpc.Code (gRPC status code) of the failure."},
            "message": {"type": "string", "description": "What went wrong, safe to show; the request id for a server fault."},
            "details": {
                "type": "array",
                "description": "google.protobuf.Any values, e.g. a google.rpc.RetryInfo with RESOURCE_EXHAUSTED.",
                "items": {"type": "object", "properties": {"@type": {"type": "string"}}, "required": ["@type"]},
            },
        },
    })
}

/// The protos' comments, by file and descriptor path (`SourceCodeInfo`).
#[derive(Default)]
struct Comments {
    by_file: BTreeMap<String, BTreeMap<Vec<i32>, String>>,
}

impl Comments {
    /// The leading comment of the element at `path` in `file`, trimmed; empty when none.
    fn at(&mut self, file: &FileDescriptor, path: &[i32]) -> String {
        let proto = file.file_descriptor_proto();
        let comments = self
            .by_file
            .entry(file.name().to_owned())
            .or_insert_with(|| {
                proto
                    .source_code_info
                    .iter()
                    .flat_map(|info| &info.location)
                    .filter_map(|l| {
                        let text = l.leading_comments.as_deref()?;
                        let text: Vec<&str> = text.lines().map(str::trim).collect();
                        Some((l.path.clone(), text.join("\n").trim().to_owned()))
                    })
                    .collect()
            });
        comments.get(path).cloned().unwrap_or_default()
    }

    fn of_field(&mut self, field: &FieldDescriptor) -> String {
        self.at(&field.parent_file(), field.path())
    }
}
