fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["sovra/v1/federation.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=sovra/v1");
    Ok(())
}
