-- Orthanc's part of the compose topology (deploy/compose.yaml, tests/test_orthanc.py): every instance a modality
-- stores here is also sent to the enhancement node, which sends its enhanced series back into the same study.
-- What the node sends (its AE title, DICOMNODE) is not sent to it again.
function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RequestOrigin'] == 'DicomProtocol' and origin['RemoteAet'] ~= 'DICOMNODE' then
    SendToModality(instanceId, 'dicomnode')
  end
end
