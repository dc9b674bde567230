//! Resources: the unit of change the watch API carries. Every object of the model is a
//! [`Resource`] named by a [`Key`] (its [`Kind`] and a name unique within the kind), and
//! travels as one JSON object:
//!
//! ```json
//! {"kind": "Workload", "name": "shop/web-0", "spec": {"name": "web-0", "namespace": "shop", ...}}
//! ```
//!
//! `spec` is the same form as an entry of the local config file (`docs/PROTOCOL.md` lists
//! every field). Decoding validates: a spec that does not describe a valid object is a
//! [`ModelError`] naming the field, for that resource alone.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ModelError;
use crate::model::{Authorization, HttpRoute, Service, Snapshot, TrustBundle, Waypoint, Workload};
use crate::yaml::{RawAuthorization, RawHttpRoute, RawService, RawTrustBundle, RawWaypoint, RawWorkload};

/// The kinds of resource, in the order a snapshot lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    TrustBundle,
    Workload,
    Service,
    Authorization,
    Waypoint,
    HttpRoute,
}

impl Kind {
    pub const ALL: [Kind; 6] =
        [Kind::TrustBundle, Kind::Workload, Kind::Service, Kind::Authorization, Kind::Waypoint, Kind::HttpRoute];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::TrustBundle => "TrustBundle",
            Kind::Workload => "Workload",
            Kind::Service => "Service",
            Kind::Authorization => "Authorization",
            Kind::Waypoint => "Waypoint",
            Kind::HttpRoute => "HttpRoute",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names a resource: its kind and a name unique within the kind (a workload's uid,
/// `<namespace>/<name>` for namespaced objects, the trust domain for a trust bundle).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Key {
    pub kind: Kind,
    pub name: String,
}

impl Key {
    pub fn new(kind: Kind, name: impl Into<String>) -> Key {
        Key { kind, name: name.into() }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// One object of the model.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    TrustBundle(TrustBundle),
    Workload(Workload),
    Service(Service),
    Authorization(Authorization),
    Waypoint(Waypoint),
    HttpRoute(HttpRoute),
}

/// A resource as it travels: kind, name and the serialized spec.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wire {
    pub kind: Kind,
    pub name: String,
    pub spec: serde_json::Value,
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::TrustBundle(_) => Kind::TrustBundle,
            Resource::Workload(_) => Kind::Workload,
            Resource::Service(_) => Kind::Service,
            Resource::Authorization(_) => Kind::Authorization,
            Resource::Waypoint(_) => Kind::Waypoint,
            Resource::HttpRoute(_) => Kind::HttpRoute,
        }
    }

    pub fn key(&self) -> Key {
        let name = match self {
            Resource::TrustBundle(b) => b.trust_domain.clone(),
            Resource::Workload(w) => w.uid.clone(),
            Resource::Service(s) => format!("{}/{}", s.namespace, s.name),
            Resource::Authorization(a) => format!("{}/{}", a.namespace, a.name),
            Resource::Waypoint(w) => format!("{}/{}", w.namespace, w.name),
            Resource::HttpRoute(r) => format!("{}/{}", r.namespace, r.name),
        };
        Key { kind: self.kind(), name }
    }

    /// The resource's wire form.
    pub fn to_wire(&self) -> Wire {
        let spec = match self {
            Resource::TrustBundle(b) => serde_json::to_value(RawTrustBundle::from(b)),
            Resource::Workload(w) => serde_json::to_value(RawWorkload::from(w)),
            Resource::Service(s) => serde_json::to_value(RawService::from(s)),
            Resource::Authorization(a) => serde_json::to_value(RawAuthorization::from(a)),
            Resource::Waypoint(w) => serde_json::to_value(RawWaypoint::from(w)),
            Resource::HttpRoute(r) => serde_json::to_value(RawHttpRoute::from(r)),
        }
        // Serializing plain structs of strings, numbers and maps with string keys into a
        // `Value` cannot fail.
        .unwrap_or(serde_json::Value::Null);
        let key = self.key();
        Wire { kind: key.kind, name: key.name, spec }
    }

    /// The resource as one line of JSON (no newline).
    pub fn encode(&self) -> String {
        // A `Wire` is a struct of a string, an enum and a `Value`: serializing it cannot fail.
        serde_json::to_string(&self.to_wire()).unwrap_or_default()
    }

    /// Decodes and validates a wire resource. The name must be the one the spec implies, so
    /// that a delete of that name removes what this upsert added.
    pub fn from_wire(wire: Wire) -> Result<Resource, ModelError> {
        let path = format!("{} {}", wire.kind, wire.name);
        let spec = |e: serde_json::Error| ModelError::field(format!("{path}: spec"), e.to_string());
        let resource = match wire.kind {
            Kind::TrustBundle => Resource::TrustBundle(
                serde_json::from_value::<RawTrustBundle>(wire.spec).map_err(spec)?.validate(&path)?,
            ),
            Kind::Workload => Resource::Workload(
                serde_json::from_value::<RawWorkload>(wire.spec)
                    .map_err(spec)?
                    .validate(&path, spiffe::DEFAULT_TRUST_DOMAIN)?,
            ),
            Kind::Service => {
                Resource::Service(serde_json::from_value::<RawService>(wire.spec).map_err(spec)?.validate(&path)?)
            }
            Kind::Authorization => Resource::Authorization(
                serde_json::from_value::<RawAuthorization>(wire.spec).map_err(spec)?.validate(&path)?,
            ),
            Kind::Waypoint => {
                Resource::Waypoint(serde_json::from_value::<RawWaypoint>(wire.spec).map_err(spec)?.validate(&path)?)
            }
            Kind::HttpRoute => {
                Resource::HttpRoute(serde_json::from_value::<RawHttpRoute>(wire.spec).map_err(spec)?.validate(&path)?)
            }
        };
        let key = resource.key();
        if key.name != wire.name {
            return Err(ModelError::field(
                format!("{path}: name"),
                format!("the spec describes {:?}, not {:?}", key.name, wire.name),
            ));
        }
        Ok(resource)
    }
}

impl Snapshot {
    /// Every object of the snapshot as a resource, the trust bundle excluded (a local file
    /// names its trust domain but carries no roots).
    pub fn resources(&self) -> impl Iterator<Item = Resource> + '_ {
        let workloads = self.workloads.iter().cloned().map(Resource::Workload);
        let services = self.services.iter().cloned().map(Resource::Service);
        let authorizations = self.authorizations.iter().cloned().map(Resource::Authorization);
        let waypoints = self.waypoints.iter().cloned().map(Resource::Waypoint);
        let routes = self.http_routes.iter().cloned().map(Resource::HttpRoute);
        workloads.chain(services).chain(authorizations).chain(waypoints).chain(routes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"
workloads:
  - {name: web-0, namespace: shop, node: node-1, addresses: [10.244.1.2], labels: {app: web}, enrolled: true, mtls: STRICT, waypoint: shop/wp}
  - {uid: "0b6f", name: api-0, namespace: shop, node: node-2, addresses: ["fd00::2", 10.244.2.2]}
services:
  - {name: api, namespace: shop, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080, appProtocol: http}], selector: {app: api}, waypoint: shop/wp}
authorizations:
  - {name: p, namespace: shop, selector: {app: api}, action: DENY, rules: [{from: [{principals: ["*", "spiffe://cluster.local/ns/a/*", "*/sa/b", "spiffe://cluster.local/ns/a/sa/c"], namespaces: [x], ipBlocks: [10.0.0.0/8, 10.1.1.1]}], ports: [8080]}]}
  - {name: mesh, namespace: weft-system, action: ALLOW}
  - {name: broken, namespace: shop, action: ALLOW, rules: [{from: [{principals: ["a*b*"]}]}]}
waypoints:
  - {name: wp, namespace: shop, addresses: [10.244.1.9]}
httpRoutes:
  - {name: canary, namespace: shop, parents: [shop/api], spec: {rules: [{backendRefs: [{name: api-v1, weight: 90}]}]}}
"#;

    #[test]
    fn every_resource_survives_the_wire() {
        let snapshot = Snapshot::from_yaml(DOC).unwrap();
        let mut n = 0;
        for r in snapshot.resources() {
            let line = r.encode();
            let wire: Wire = serde_json::from_str(&line).unwrap();
            let back = Resource::from_wire(wire).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(back, r, "{line}");
            n += 1;
        }
        assert_eq!(n, 8);
        let bundle = Resource::TrustBundle(TrustBundle {
            trust_domain: "cluster.local".into(),
            roots: vec!["-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()],
        });
        let back = Resource::from_wire(serde_json::from_str(&bundle.encode()).unwrap()).unwrap();
        assert_eq!(back, bundle);
    }

    /// A crash input of the `watch_stream` fuzz target: a number in a route's spec that
    /// serde_json's default float parser (fast, not correctly rounded) read as one value, then
    /// as another after it was written back, so the resource changed at every hop.
    #[test]
    fn numbers_in_a_route_spec_survive_the_wire() {
        let line = r#"{"kind":"HttpRoute","name":"shop/canary","spec":{"name":"canary","namespace":"shop","parents":["shop/api"],"spec":{"rules":[{"backendRefs":[{"name":"api-v2","weight":1011111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111}]}]}}}"#;
        let first = Resource::from_wire(serde_json::from_str(line).unwrap()).unwrap();
        let again = Resource::from_wire(serde_json::from_str(&first.encode()).unwrap()).unwrap();
        assert_eq!(again, first);
    }

    #[test]
    fn broken_policies_stay_broken_on_the_wire() {
        let snapshot = Snapshot::from_yaml(DOC).unwrap();
        let broken = Resource::Authorization(snapshot.authorizations[2].clone());
        let back = Resource::from_wire(serde_json::from_str(&broken.encode()).unwrap()).unwrap();
        assert_eq!(back, broken, "the same policy, its reason as first written");
        let Resource::Authorization(a) = back else { panic!() };
        assert!(a.broken.is_some(), "a policy that failed closed must still fail closed after the wire");
        assert!(a.broken.unwrap().starts_with("authorizations[2]"), "the reason names the field where it was read");
    }

    #[test]
    fn keys_name_resources() {
        let snapshot = Snapshot::from_yaml(DOC).unwrap();
        let keys: Vec<String> = snapshot.resources().map(|r| r.key().to_string()).collect();
        assert_eq!(keys[0], "Workload shop/web-0");
        assert_eq!(keys[1], "Workload 0b6f");
        assert_eq!(keys[2], "Service shop/api");
    }

    #[test]
    fn invalid_specs_are_refused_with_the_field() {
        let wire = |s: &str| serde_json::from_str::<Wire>(s).unwrap();
        let cases = [
            (
                r#"{"kind":"Service","name":"shop/api","spec":{"name":"api","namespace":"shop","vips":["10.96.0.1"],"ports":[{"port":0}]}}"#,
                "port 0",
            ),
            (
                r#"{"kind":"Workload","name":"shop/w","spec":{"name":"w","namespace":"shop","node":"n","addresses":["x"]}}"#,
                "not an IP address",
            ),
            (
                r#"{"kind":"Authorization","name":"shop/p","spec":{"name":"p","namespace":"shop","action":"ALLOW","colour":"red"}}"#,
                "unknown field `colour`",
            ),
            (
                r#"{"kind":"Service","name":"shop/other","spec":{"name":"api","namespace":"shop","vips":["10.96.0.1"],"ports":[{"port":80}]}}"#,
                "not \"shop/other\"",
            ),
        ];
        for (text, why) in cases {
            let err = Resource::from_wire(wire(text)).unwrap_err();
            assert!(err.to_string().contains(why), "{text}: {err}");
        }
        assert!(serde_json::from_str::<Wire>(r#"{"kind":"Pod","name":"a","spec":{}}"#).is_err(), "unknown kind");
    }
}
