//! GitHub credential injection for one sandbox.
//!
//! For the GitHub hosts only (github.com and api.github.com by default), the
//! door ends the sandbox's TLS itself (`crate::intercept`), with a certificate
//! from a CA made for this lease alone and trusted only through the CA bundle bound into this
//! sandbox. Each request then gets the lease's GitHub App installation token
//! (minted on the host by `moat_creds::GithubBroker`, down-scoped to the
//! lease's repositories) and goes to the configured upstream over verified
//! TLS. Pushes to protected branches are refused here, whatever the token
//! may do: `git push` over smart HTTP by reading the pushed ref updates, and
//! the REST and GraphQL calls that move a branch by reading their paths and
//! bodies.
//!
//! Must never: hand the token or anything of the App to the sandbox, accept a
//! credential other than this lease's placeholder, intercept a host that is not
//! configured, forward a ref update to a protected branch it could not read,
//! or put a token, placeholder, header value or body in a log or audit record.

mod access;
mod protect;
mod proxy;
pub(crate) mod push;
mod report;

/// The lease CA's bundle, shared by every intercepted service.
pub use crate::intercept::{CA_BUNDLE_PATH, SYSTEM_BUNDLE};
pub(crate) use access::GithubState;
pub use access::{
    GithubAccess, HostRole, InterceptedHost, PushGate, TokenAudit, TokenRecord,
    DEFAULT_PERMISSIONS, DEFAULT_PROTECTED,
};
pub(crate) use proxy::handle;
pub use proxy::{GithubActivity, GithubRecord, RefusedRef};
