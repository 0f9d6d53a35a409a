//! containerd runs this binary for runtime type `io.containerd.arrow.v1`.

use containerd_shim::asynchronous::run;
use shim::service::ArrowShim;

#[tokio::main]
async fn main() {
    run::<ArrowShim>(shim::service::RUNTIME_ID, None).await;
}
