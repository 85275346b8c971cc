//! Authorization: the [`Authorizer`] and its tower layer.

mod authorizer;
mod future;
mod layer;

pub use authorizer::{Authorizer, AuthorizerBuilder, Decision};
pub use layer::{
    AuthzLayer, AuthzService, REQUEST_ID_HEADER, ResponseFuture as AuthzResponseFuture,
};
