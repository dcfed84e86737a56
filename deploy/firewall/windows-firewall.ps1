# Windows Firewall for VoiceGrow (section 5.2.2 of the deployment document). Run in an elevated
# PowerShell:  powershell -ExecutionPolicy Bypass -File windows-firewall.ps1 -Speakers 192.168.1.0/24
# Opens the speakers' WebSocket port and the HTTP API to the networks given (the document opens them
# to everyone, and MinIO's 9000/9001 too: the stack publishes neither, the console is on 127.0.0.1).
# The rules carry the group "VoiceGrow", so running the script again replaces them.
param(
    [string[]] $Speakers = @("192.168.0.0/16"),
    [string[]] $Operators = @("192.168.0.0/16"),
    [int] $WsPort = 4399,
    [int] $HttpPort = 8000,
    [switch] $Tls
)
$ErrorActionPreference = "Stop"

Get-NetFirewallRule -Group "VoiceGrow" -ErrorAction SilentlyContinue | Remove-NetFirewallRule

New-NetFirewallRule -Group "VoiceGrow" -DisplayName "VoiceGrow WebSocket" -Direction Inbound -Protocol TCP -LocalPort $WsPort -RemoteAddress $Speakers -Action Allow
New-NetFirewallRule -Group "VoiceGrow" -DisplayName "VoiceGrow HTTP API" -Direction Inbound -Protocol TCP -LocalPort $HttpPort -RemoteAddress $Operators -Action Allow
if ($Tls) {
    New-NetFirewallRule -Group "VoiceGrow" -DisplayName "VoiceGrow HTTPS" -Direction Inbound -Protocol TCP -LocalPort 80,443,4443 -Action Allow
}
Get-NetFirewallRule -Group "VoiceGrow" | Format-Table DisplayName, Enabled, Direction, Action
