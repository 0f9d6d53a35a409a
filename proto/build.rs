//! Generates the agent protocol types from `agent.proto` with prost, and,
//! with feature `cri`, the Kubernetes CRI `runtime.v1` API from
//! `cri/api.proto` with tonic (client and server).

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=agent.proto");
    prost_build::Config::new().compile_protos(&["agent.proto"], &["."])?;
    #[cfg(feature = "cri")]
    {
        println!("cargo:rerun-if-changed=cri/api.proto");
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .compile_protos(&["cri/api.proto"], &["cri"])?;
    }
    Ok(())
}
