//! The HTTP/JSON routes: one table mapping every RPC of the public services to a
//! resource-style path in the manner of Google's HTTP annotations (`google.api.http`). The
//! gateway routes by it and the OpenAPI document is generated from it, so the two cannot
//! disagree; a test checks that every RPC of the descriptor set has exactly one route.

/// The HTTP method of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Reads: the fields not bound by the path come from the query string.
    Get,
    /// Everything else: the fields not bound by the path come from the JSON body
    /// (`body: "*"` in Google's terms).
    Post,
}

impl Method {
    /// The method's name as HTTP spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
        }
    }
}

/// One RPC's HTTP binding.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// The fully qualified service, e.g. `tenantkms.v1.KeyService`.
    pub service: &'static str,
    /// The RPC's name in that service, e.g. `Encrypt`.
    pub rpc: &'static str,
    /// The HTTP method.
    pub method: Method,
    /// The path template: `{field}` segments bind request fields (by their proto names), and
    /// the last segment may end with a `:verb` custom method.
    pub path: &'static str,
}

const KEYS: &str = "tenantkms.v1.KeyService";
const TENANTS: &str = "tenantkms.v1.TenantService";
const AUDIT: &str = "tenantkms.v1.AuditService";

const fn route(
    service: &'static str,
    rpc: &'static str,
    method: Method,
    path: &'static str,
) -> Route {
    Route {
        service,
        rpc,
        method,
        path,
    }
}

/// Every route, in the order the OpenAPI document lists them.
pub const ROUTES: &[Route] = &[
    // TenantService: tenants as resources, state changes as custom methods.
    route(TENANTS, "CreateTenant", Method::Post, "/v1/tenants"),
    route(TENANTS, "ListTenants", Method::Get, "/v1/tenants"),
    route(TENANTS, "GetTenant", Method::Get, "/v1/tenants/{tenant_id}"),
    route(
        TENANTS,
        "RotateTenantKey",
        Method::Post,
        "/v1/tenants/{tenant_id}:rotateKey",
    ),
    route(
        TENANTS,
        "SetRotationPolicy",
        Method::Post,
        "/v1/tenants/{tenant_id}:setRotationPolicy",
    ),
    route(
        TENANTS,
        "SuspendTenant",
        Method::Post,
        "/v1/tenants/{tenant_id}:suspend",
    ),
    route(
        TENANTS,
        "ResumeTenant",
        Method::Post,
        "/v1/tenants/{tenant_id}:resume",
    ),
    route(
        TENANTS,
        "ScheduleTenantDeletion",
        Method::Post,
        "/v1/tenants/{tenant_id}:scheduleDeletion",
    ),
    route(
        TENANTS,
        "CancelTenantDeletion",
        Method::Post,
        "/v1/tenants/{tenant_id}:cancelDeletion",
    ),
    route(
        TENANTS,
        "ListKeyVersions",
        Method::Get,
        "/v1/tenants/{tenant_id}/keyVersions",
    ),
    route(
        TENANTS,
        "DisableKeyVersion",
        Method::Post,
        "/v1/tenants/{tenant_id}/keyVersions/{version}:disable",
    ),
    route(
        TENANTS,
        "EnableKeyVersion",
        Method::Post,
        "/v1/tenants/{tenant_id}/keyVersions/{version}:enable",
    ),
    route(
        TENANTS,
        "DestroyKeyVersion",
        Method::Post,
        "/v1/tenants/{tenant_id}/keyVersions/{version}:destroy",
    ),
    route(
        TENANTS,
        "DeclareBlindIndex",
        Method::Post,
        "/v1/blindIndexes",
    ),
    route(TENANTS, "ListBlindIndexes", Method::Get, "/v1/blindIndexes"),
    // KeyService: the data plane, custom methods on the tenant.
    route(
        KEYS,
        "Encrypt",
        Method::Post,
        "/v1/tenants/{tenant_id}:encrypt",
    ),
    route(
        KEYS,
        "Decrypt",
        Method::Post,
        "/v1/tenants/{tenant_id}:decrypt",
    ),
    route(
        KEYS,
        "EncryptBatch",
        Method::Post,
        "/v1/tenants/{tenant_id}:encryptBatch",
    ),
    route(
        KEYS,
        "DecryptBatch",
        Method::Post,
        "/v1/tenants/{tenant_id}:decryptBatch",
    ),
    route(
        KEYS,
        "GenerateDataKey",
        Method::Post,
        "/v1/tenants/{tenant_id}:generateDataKey",
    ),
    route(
        KEYS,
        "GenerateDataKeyWithoutPlaintext",
        Method::Post,
        "/v1/tenants/{tenant_id}:generateDataKeyWithoutPlaintext",
    ),
    route(
        KEYS,
        "DecryptDataKey",
        Method::Post,
        "/v1/tenants/{tenant_id}:decryptDataKey",
    ),
    route(
        KEYS,
        "Rewrap",
        Method::Post,
        "/v1/tenants/{tenant_id}:rewrap",
    ),
    route(
        KEYS,
        "RewrapBatch",
        Method::Post,
        "/v1/tenants/{tenant_id}:rewrapBatch",
    ),
    route(
        KEYS,
        "ComputeBlindIndex",
        Method::Post,
        "/v1/tenants/{tenant_id}:computeBlindIndex",
    ),
    // AuditService.
    route(
        AUDIT,
        "ListAuditEvents",
        Method::Get,
        "/v1/tenants/{tenant_id}/auditEvents",
    ),
    route(
        AUDIT,
        "VerifyAuditChain",
        Method::Post,
        "/v1/auditChain:verify",
    ),
    route(
        AUDIT,
        "GetUsage",
        Method::Get,
        "/v1/tenants/{tenant_id}/usage",
    ),
    // Containment (issue 16): tokens as resources, the steps as custom methods.
    route(
        TENANTS,
        "QuarantineToken",
        Method::Post,
        "/v1/tokens/{token_id}:quarantine",
    ),
    route(
        TENANTS,
        "ReleaseToken",
        Method::Post,
        "/v1/tokens/{token_id}:release",
    ),
    route(
        TENANTS,
        "ContainToken",
        Method::Post,
        "/v1/tokens/{token_id}:contain",
    ),
];

/// A request path matched to a route.
#[derive(Debug)]
pub struct Matched<'a> {
    /// The route.
    pub route: &'static Route,
    /// The path-bound fields (proto field name, raw segment text).
    pub bindings: Vec<(&'static str, &'a str)>,
}

/// Why no route was matched.
#[derive(Debug, PartialEq, Eq)]
pub enum NoRoute {
    /// No template has this path.
    NotFound,
    /// Templates have this path, with other methods (listed for the `Allow` header).
    MethodNotAllowed(Vec<&'static str>),
}

/// Matches `method` and `path` (without the query string) against [`ROUTES`].
pub fn find<'a>(method: &str, path: &'a str) -> Result<Matched<'a>, NoRoute> {
    let mut allowed = Vec::new();
    for route in ROUTES {
        if let Some(bindings) = match_template(route.path, path) {
            if route.method.as_str() == method {
                return Ok(Matched { route, bindings });
            }
            allowed.push(route.method.as_str());
        }
    }
    if allowed.is_empty() {
        Err(NoRoute::NotFound)
    } else {
        Err(NoRoute::MethodNotAllowed(allowed))
    }
}

/// Splits a path's last segment into the segment and its `:verb` (`None` without one).
fn split_verb(path: &str) -> (&str, Option<&str>) {
    let last_start = path.rfind('/').map_or(0, |i| i + 1);
    match path.get(last_start..).and_then(|last| last.rfind(':')) {
        Some(colon) => (
            path.get(..last_start + colon).unwrap_or(path),
            path.get(last_start + colon + 1..),
        ),
        None => (path, None),
    }
}

/// The bindings of `path` under `template`, or `None` when it does not match. A bound
/// segment must be non-empty text without `/`; a template's verb must be the path's.
fn match_template<'a>(
    template: &'static str,
    path: &'a str,
) -> Option<Vec<(&'static str, &'a str)>> {
    let (template, verb) = split_verb(template);
    let path = match verb {
        Some(verb) => path.strip_suffix(verb)?.strip_suffix(':')?,
        None => path,
    };
    let mut bindings = Vec::new();
    let mut segments = path.split('/');
    for expected in template.split('/') {
        let segment = segments.next()?;
        match expected.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(field) => {
                // Without a verb, a segment holding one would be another route's.
                if segment.is_empty() || (verb.is_none() && segment.contains(':')) {
                    return None;
                }
                bindings.push((field, segment));
            }
            None if segment == expected => {}
            None => return None,
        }
    }
    segments.next().is_none().then_some(bindings)
}

/// The fields a template binds, in order.
pub fn path_fields(template: &str) -> Vec<&str> {
    split_verb(template)
        .0
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_their_routes_only() {
        let m = find("POST", "/v1/tenants/acme:encrypt").unwrap();
        assert_eq!(m.route.rpc, "Encrypt");
        assert_eq!(m.bindings, vec![("tenant_id", "acme")]);
        let m = find("GET", "/v1/tenants/acme").unwrap();
        assert_eq!(m.route.rpc, "GetTenant");
        let m = find("POST", "/v1/tenants/acme/keyVersions/3:disable").unwrap();
        assert_eq!(m.route.rpc, "DisableKeyVersion");
        assert_eq!(m.bindings, vec![("tenant_id", "acme"), ("version", "3")]);
        assert_eq!(
            find("POST", "/v1/tenants").unwrap().route.rpc,
            "CreateTenant"
        );
        assert_eq!(find("GET", "/v1/tenants").unwrap().route.rpc, "ListTenants");
        assert_eq!(
            find("POST", "/v1/auditChain:verify").unwrap().route.rpc,
            "VerifyAuditChain"
        );
        assert_eq!(
            find("GET", "/v1/tenants/acme:frobnicate").unwrap_err(),
            NoRoute::NotFound
        );
        assert_eq!(
            find("POST", "/v1/tenants/:encrypt").unwrap_err(),
            NoRoute::NotFound
        );
        assert_eq!(
            find("GET", "/v1/tenants/acme/extra").unwrap_err(),
            NoRoute::NotFound
        );
        assert_eq!(find("GET", "/v2/tenants").unwrap_err(), NoRoute::NotFound);
        assert_eq!(
            find("DELETE", "/v1/tenants/acme").unwrap_err(),
            NoRoute::MethodNotAllowed(vec!["GET"])
        );
        assert_eq!(
            find("GET", "/v1/tenants/acme:encrypt").unwrap_err(),
            NoRoute::MethodNotAllowed(vec!["POST"])
        );
    }

    #[test]
    fn no_two_routes_share_a_method_and_template() {
        let mut seen = std::collections::BTreeSet::new();
        for route in ROUTES {
            assert!(
                seen.insert((route.method.as_str(), route.path)),
                "{route:?}"
            );
            assert!(seen.insert(("rpc", route.rpc)), "{} twice", route.rpc);
        }
        assert_eq!(
            path_fields("/v1/tenants/{tenant_id}/keyVersions/{version}:x"),
            ["tenant_id", "version"]
        );
    }
}
