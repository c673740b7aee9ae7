//! Route selection: the first route (in priority, then declared order) whose conditions all
//! hold for a request on a given listener.
use http::Uri;
use http::request::Parts;

use crate::config::model::{Model, Route};

/// The routes that apply to one listener, in match order.
#[derive(Debug, Clone)]
pub struct Router {
    /// Indices into `Model::routes`.
    routes: Vec<usize>,
}

impl Router {
    /// Collects the routes of `model` that apply to listener index `listener`.
    pub fn new(model: &Model, listener: usize) -> Self {
        let routes = model
            .routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.listeners.is_empty() || r.listeners.contains(&listener))
            .map(|(i, _)| i)
            .collect();
        Router { routes }
    }

    /// Index into `Model::routes` of the route for this request, or `None` (→ 404).
    pub fn route(&self, _model: &Model, _req: &Parts) -> Option<usize> {
        // Interim: first applicable route; replaced by the full matcher.
        self.routes.first().copied()
    }
}

/// The URI to send upstream after applying `route`'s rewrite (query preserved).
pub fn rewrite_uri(_route: &Route, uri: &Uri) -> Uri {
    uri.clone()
}
