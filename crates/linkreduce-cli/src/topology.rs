//! How GPUs are connected, as `nvidia-smi topo -m` reports it: CUDA tells
//! whether peers can access each other but not over what, and NVML is not
//! among our dependencies, while nvidia-smi ships with every driver.

use std::collections::HashMap;
use std::process::Command;

/// A PCI address: domain, bus, device, function.
type PciAddress = (u32, u32, u32, u32);

/// The connection matrix, addressed by PCI address.
pub struct Topology {
    /// nvidia-smi's GPU index of each PCI address.
    index_of: HashMap<PciAddress, usize>,
    /// nvidia-smi's label ("X", "NV18", "PIX", "SYS", ...) per index pair.
    links: HashMap<(usize, usize), String>,
}

impl Topology {
    /// Asks nvidia-smi; None when it is missing or says something else.
    pub fn query() -> Option<Topology> {
        let run = |args: &[&str]| -> Option<String> {
            let output = Command::new("nvidia-smi").args(args).output().ok()?;
            output
                .status
                .success()
                .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
        };
        let buses = run(&["--query-gpu=index,pci.bus_id", "--format=csv,noheader"])?;
        let matrix = run(&["topo", "-m"])?;
        Some(Topology {
            index_of: parse_bus_ids(&buses),
            links: parse_matrix(&matrix),
        })
    }

    /// The link between the GPUs at two PCI bus ids (as CUDA prints them).
    pub fn link(&self, from: &str, to: &str) -> Option<&str> {
        let from = self.index_of.get(&parse_pci(from)?)?;
        let to = self.index_of.get(&parse_pci(to)?)?;
        self.links.get(&(*from, *to)).map(String::as_str)
    }
}

/// The number of bonded NVLinks a label names ("NV18" -> 18).
pub fn nvlinks(label: &str) -> Option<u32> {
    label.strip_prefix("NV")?.parse().ok()
}

/// "0000:18:00.0" or "00000000:18:00.0" (hex) into its parts.
fn parse_pci(text: &str) -> Option<PciAddress> {
    let text = text.trim();
    let (domain, rest) = text.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    Some((hex(domain)?, hex(bus)?, hex(device)?, hex(function)?))
}

/// Lines "0, 00000000:18:00.0" into PCI address -> index.
fn parse_bus_ids(text: &str) -> HashMap<PciAddress, usize> {
    text.lines()
        .filter_map(|line| {
            let (index, bus) = line.split_once(',')?;
            Some((parse_pci(bus)?, index.trim().parse().ok()?))
        })
        .collect()
}

/// The GPU rows and columns of `nvidia-smi topo -m` (tab-separated, the
/// header underlined with terminal escapes) into (row, column) -> label.
fn parse_matrix(text: &str) -> HashMap<(usize, usize), String> {
    let gpu = |cell: &str| cell.trim().strip_prefix("GPU")?.parse::<usize>().ok();
    let mut lines = text.lines().map(strip_escapes);
    let Some(header) = lines.next() else {
        return HashMap::new();
    };
    // The header has no cell above the row names: its cells line up with
    // each row's cells after the first.
    let columns: Vec<Option<usize>> = header.split('\t').skip(1).map(gpu).collect();
    let mut links = HashMap::new();
    for line in lines {
        let mut cells = line.split('\t');
        let Some(row) = cells.next().and_then(gpu) else {
            continue;
        };
        for (column, cell) in columns.iter().zip(cells) {
            if let Some(column) = column {
                links.insert((row, *column), cell.trim().to_string());
            }
        }
    }
    links
}

/// `text` without terminal escape sequences (ESC [ ... letter).
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_H200: &str =
        "\t\u{1b}[4mGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\u{1b}[0m\n\
GPU0\t X \tNV18\t0-15\t0\t\tN/A\n\
GPU1\tNV18\t X \t0-15\t0\t\tN/A\n\
\n\
Legend:\n\
  X    = Self\n";

    #[test]
    fn the_matrix_and_bus_ids_give_links_between_cuda_devices() {
        let topology = Topology {
            index_of: parse_bus_ids("0, 00000000:18:00.0\n1, 00000000:2A:00.0\n"),
            links: parse_matrix(TWO_H200),
        };
        assert_eq!(topology.link("0000:18:00.0", "0000:2a:00.0"), Some("NV18"));
        assert_eq!(topology.link("0000:2A:00.0", "0000:18:00.0"), Some("NV18"));
        assert_eq!(topology.link("0000:18:00.0", "0000:18:00.0"), Some("X"));
        assert_eq!(topology.link("0000:99:00.0", "0000:18:00.0"), None);
        assert_eq!(nvlinks("NV18"), Some(18));
        assert_eq!(nvlinks("SYS"), None);
    }

    #[test]
    fn rows_of_other_devices_and_garbage_are_skipped() {
        let text = "\tGPU0\tNIC0\nGPU0\t X \tPIX\nNIC0\tPIX\t X \n";
        let links = parse_matrix(text);
        assert_eq!(links.len(), 1);
        assert_eq!(links[&(0, 0)], "X");
        assert!(parse_matrix("").is_empty());
        assert_eq!(parse_pci("not a bus id"), None);
    }
}
