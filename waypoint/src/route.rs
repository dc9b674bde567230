//! Route matching and backend selection for the Gateway API `HTTPRoute`s of a service.
