//! The SPOE agent that authorises every inbound mTLS connection.
//!
//! HAProxy 2.6 cannot read a URI SAN, so its `filter spoe` sends the client certificate
//! (`ssl_c_der`) to this agent on `on-frontend-tcp-request`; the agent answers with a session
//! variable that a `tcp-request content reject` rule checks. The agent is split so that the
//! policy can be tested without sockets:
//!
//! - [`frame`]: the SPOP 2.0 wire codec, as HAProxy 2.6 speaks it (and as 3.x still accepts);
//! - [`authz`]: the pure decision from a client certificate and the current intentions;
//! - [`server`]: the unix-socket server on its own tokio runtime that ties the two together.

pub mod authz;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod server;

pub(crate) use crate::pki::ForgetfulMap;
