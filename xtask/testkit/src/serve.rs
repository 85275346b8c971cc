//! An axum router served on a free loopback port.

use std::net::SocketAddr;

/// Serves `router` on a free `127.0.0.1` port in a background task; returns
/// the address. The server runs until the runtime shuts down; it panics
/// (failing the task) if serving fails.
pub async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        axum::serve(listener, router)
            .await
            .expect("serve the router")
    });
    addr
}

/// [`serve`], returning the base URL `http://127.0.0.1:PORT`.
pub async fn serve_url(router: axum::Router) -> String {
    format!("http://{}", serve(router).await)
}
