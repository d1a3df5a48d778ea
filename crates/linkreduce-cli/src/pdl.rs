//! `--pdl on|off`, shared by `bench` and `check`: whether the all-reduce
//! kernels are launched as programmatic dependent launches
//! (`Config::programmatic_launch`; docs/design.md, "Programmatic dependent
//! launch"). Without the option LINKREDUCE_PDL decides, on where unset.

use clap::ValueEnum;
use linkreduce::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pdl {
    On,
    Off,
}

impl Pdl {
    /// Sets `config` as `option` says; None leaves it to the variable.
    pub fn apply(option: Option<Pdl>, config: &mut Config) {
        if let Some(pdl) = option {
            config.programmatic_launch = Some(pdl == Pdl::On);
        }
    }

    /// The option as a command line writes it ("" where not given).
    pub fn flag(option: Option<Pdl>) -> &'static str {
        match option {
            Some(Pdl::On) => " --pdl on",
            Some(Pdl::Off) => " --pdl off",
            None => "",
        }
    }
}
