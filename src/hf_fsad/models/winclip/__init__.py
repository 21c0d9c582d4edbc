"""WinCLIP / WinCLIP+: `configuration_winclip.WinClipConfig`, `modeling_winclip.WinClipModel`."""
