// 20 string rules of the kind incident responders hunt memory with (benchmarks/bench_yara.py):
// credentials, key material, tools and web shells; text, wide text, nocase and hex strings.

rule pem_private_key { strings: $a = "-----BEGIN RSA PRIVATE KEY-----" condition: $a }
rule openssh_key { strings: $a = "-----BEGIN OPENSSH PRIVATE KEY-----" condition: $a }
rule pgp_private { strings: $a = "-----BEGIN PGP PRIVATE KEY BLOCK-----" condition: $a }
rule aws_secret_name { strings: $a = "aws_secret_access_key" nocase condition: $a }
rule password_assign { strings: $a = "password=" nocase ascii wide condition: $a }
rule authorization_basic { strings: $a = "Authorization: Basic " condition: $a }
rule bearer_token { strings: $a = "Authorization: Bearer " condition: $a }
rule mimikatz { strings: $a = "sekurlsa::logonpasswords" nocase ascii wide condition: $a }
rule cobalt_beacon { strings: $a = "%s as %s\\%s: %d" condition: $a }
rule meterpreter { strings: $a = "metsrv.dll" ascii wide condition: $a }
rule php_webshell { strings: $a = "eval(base64_decode(" nocase condition: $a }
rule jsp_webshell { strings: $a = "Runtime.getRuntime().exec(" condition: $a }
rule powershell_enc { strings: $a = "powershell -enc" nocase ascii wide condition: $a }
rule netcat_shell { strings: $a = "nc -e /bin/sh" condition: $a }
rule shadow_line { strings: $a = "root:$6$" condition: $a }
rule private_key_der { strings: $a = { 30 82 ?? ?? 02 01 00 02 82 01 01 00 } condition: $a }
rule pkcs8_der { strings: $a = { 30 82 ?? ?? 02 01 00 30 0D 06 09 2A 86 48 86 F7 0D 01 01 01 } condition: $a }
rule slack_webhook { strings: $a = "hooks.slack.com/services/" condition: $a }
rule connection_string { strings: $a = "Password=" ascii wide condition: $a }
rule ssh_agent { strings: $a = "SSH_AUTH_SOCK=" condition: $a }
