//! HAProxy's side: the operations between two desired states (`diff`), the Dataplane API that
//! applies them (`dataplane`), and HAProxy's own sockets (`runtime`). Nothing here reads Consul.

pub mod dataplane;
pub mod diff;
pub mod runtime;
pub mod version;
