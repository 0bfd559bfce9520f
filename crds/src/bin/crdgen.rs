//! `crdgen [DIR]`: writes the relayfed CRDs as YAML into DIR (default `charts/relayfed/crds`)
//! and the optional MCS CRD template beside it (`DIR/../templates/mcs-crds.yaml`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).map_or_else(|| PathBuf::from("charts/relayfed/crds"), PathBuf::from);
    std::fs::create_dir_all(&dir)?;
    for (name, text) in relayfed_crds::generate::crd_files()? {
        let path = dir.join(&name);
        std::fs::write(&path, text)?;
        println!("wrote {}", path.display());
    }
    let chart = dir.parent().map_or_else(|| PathBuf::from("."), PathBuf::from);
    let path = chart.join(relayfed_crds::generate::MCS_TEMPLATE);
    std::fs::write(&path, relayfed_crds::generate::mcs_template()?)?;
    println!("wrote {}", path.display());
    Ok(())
}
